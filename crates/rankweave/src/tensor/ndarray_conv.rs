//! Conversions between [`Tensor`] and `ndarray` arrays (feature `ndarray`).

use super::Tensor;
use crate::dtype::Element;
use crate::error::{Error, Result};
use ndarray::{ArrayBase, ArrayD, Data, Dimension, IxDyn};

impl Tensor {
    /// A tensor with the array's shape and elements (in logical row-major
    /// order, whatever the array's memory layout).
    pub fn from_ndarray<T: Element, S: Data<Elem = T>, D: Dimension>(a: &ArrayBase<S, D>) -> Tensor {
        let shape = a.shape().to_vec();
        let t = match a.as_slice() {
            Some(s) => Tensor::from_slice(s, shape),
            None => Tensor::from_vec(a.iter().copied().collect::<Vec<T>>(), shape),
        };
        // The element count always matches the array's own shape.
        t.unwrap_or_else(|e| unreachable!("array shape and element count disagree: {e}"))
    }

    /// The elements as a dynamic-dimensional array; `T` must match the dtype.
    pub fn to_ndarray<T: Element>(&self) -> Result<ArrayD<T>> {
        self.check_cpu()?;
        let v = self.to_vec::<T>()?;
        ArrayD::from_shape_vec(IxDyn(self.shape()), v)
            .map_err(|e| Error::invalid(format!("tensor of shape {:?} to ndarray: {e}", self.shape())))
    }
}

impl<T: Element, S: Data<Elem = T>, D: Dimension> From<&ArrayBase<S, D>> for Tensor {
    fn from(a: &ArrayBase<S, D>) -> Tensor {
        Tensor::from_ndarray(a)
    }
}

impl<T: Element> TryFrom<&Tensor> for ArrayD<T> {
    type Error = Error;
    fn try_from(t: &Tensor) -> Result<ArrayD<T>> {
        t.to_ndarray()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::dtype::DType;
    use ndarray::{arr2, Array3};

    #[test]
    fn round_trip_and_layouts() {
        let a = arr2(&[[1.0f32, 2.0, 3.0], [4.0, 5.0, 6.0]]);
        let t = Tensor::from(&a);
        assert_eq!(t.shape(), &[2, 3]);
        assert_eq!(t.dtype(), DType::F32);
        assert_eq!(t.as_slice::<f32>().unwrap(), &[1.0, 2.0, 3.0, 4.0, 5.0, 6.0]);
        let back: ArrayD<f32> = (&t).try_into().unwrap();
        assert_eq!(back, a.clone().into_dyn());
        // A transposed (non-standard layout) view converts in logical order.
        let tt = Tensor::from_ndarray(&a.t());
        assert_eq!(tt.shape(), &[3, 2]);
        assert_eq!(tt.as_slice::<f32>().unwrap(), &[1.0, 4.0, 2.0, 5.0, 3.0, 6.0]);
        assert!(t.to_ndarray::<i64>().is_err());
        let z = Array3::<i64>::zeros((2, 0, 3));
        let tz = Tensor::from(&z);
        assert_eq!(tz.shape(), &[2, 0, 3]);
        assert_eq!(tz.to_ndarray::<i64>().unwrap().shape(), &[2, 0, 3]);
    }
}
