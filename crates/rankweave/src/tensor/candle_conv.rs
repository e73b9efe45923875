//! Conversions between [`Tensor`] and `candle_core::Tensor` (feature `candle`).
//!
//! Both directions copy. Element types map one to one where both sides have
//! them (u8, i32, i64, f16, bf16, f32, f64); the others (i8 here; u32, i16
//! and the 8/6/4-bit floats in candle) are refused with
//! [`Error::Unsupported`]. Only CPU candle tensors convert.

use super::Tensor;
use crate::dtype::{DType, Element};
use crate::error::{Error, Result};
use half::{bf16, f16};

fn candle_err(what: &str, e: candle_core::Error) -> Error {
    Error::invalid(format!("candle {what}: {e}"))
}

fn to_candle_typed<T: Element + candle_core::WithDType>(t: &Tensor) -> Result<candle_core::Tensor> {
    candle_core::Tensor::from_slice(t.as_slice::<T>()?, t.shape(), &candle_core::Device::Cpu)
        .map_err(|e| candle_err("from_slice", e))
}

fn from_candle_typed<T: Element + candle_core::WithDType>(t: &candle_core::Tensor) -> Result<Tensor> {
    let v = t.flatten_all().and_then(|f| f.to_vec1::<T>()).map_err(|e| candle_err("to_vec1", e))?;
    Tensor::from_vec(v, t.dims().to_vec())
}

impl Tensor {
    /// A CPU `candle_core::Tensor` with the same shape and elements.
    pub fn to_candle(&self) -> Result<candle_core::Tensor> {
        self.check_cpu()?;
        match self.dtype() {
            DType::U8 => to_candle_typed::<u8>(self),
            DType::I32 => to_candle_typed::<i32>(self),
            DType::I64 => to_candle_typed::<i64>(self),
            DType::F16 => to_candle_typed::<f16>(self),
            DType::BF16 => to_candle_typed::<bf16>(self),
            DType::F32 => to_candle_typed::<f32>(self),
            DType::F64 => to_candle_typed::<f64>(self),
            DType::I8 => Err(Error::Unsupported("candle has no int8 dtype".into())),
        }
    }

    /// A tensor with the shape and elements of a CPU candle tensor (any
    /// layout; elements in logical row-major order).
    pub fn from_candle(t: &candle_core::Tensor) -> Result<Tensor> {
        if !t.device().is_cpu() {
            return Err(Error::Unsupported(format!(
                "candle tensor on {:?}; only cpu tensors convert",
                t.device().location()
            )));
        }
        use candle_core::DType as C;
        match t.dtype() {
            C::U8 => from_candle_typed::<u8>(t),
            C::I32 => from_candle_typed::<i32>(t),
            C::I64 => from_candle_typed::<i64>(t),
            C::F16 => from_candle_typed::<f16>(t),
            C::BF16 => from_candle_typed::<bf16>(t),
            C::F32 => from_candle_typed::<f32>(t),
            C::F64 => from_candle_typed::<f64>(t),
            other => Err(Error::Unsupported(format!("candle dtype {other:?} has no rankweave equivalent"))),
        }
    }
}

impl TryFrom<&Tensor> for candle_core::Tensor {
    type Error = Error;
    fn try_from(t: &Tensor) -> Result<candle_core::Tensor> {
        t.to_candle()
    }
}

impl TryFrom<&candle_core::Tensor> for Tensor {
    type Error = Error;
    fn try_from(t: &candle_core::Tensor) -> Result<Tensor> {
        Tensor::from_candle(t)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trip_every_shared_dtype() {
        for dt in [DType::U8, DType::I32, DType::I64, DType::F16, DType::BF16, DType::F32, DType::F64] {
            let t = Tensor::from_f64(&[0.0, 1.0, 2.0, 3.0, 4.0, 5.0], [2, 3], dt).unwrap();
            let c = t.to_candle().unwrap();
            assert_eq!(c.dims(), &[2, 3]);
            assert_eq!(Tensor::from_candle(&c).unwrap(), t, "{dt}");
        }
        assert!(matches!(Tensor::vec1(&[1i8]).to_candle(), Err(Error::Unsupported(_))));
    }

    #[test]
    fn non_contiguous_candle_tensors_convert_in_logical_order() {
        let c = candle_core::Tensor::arange(0f32, 6.0, &candle_core::Device::Cpu).unwrap().reshape((2, 3)).unwrap();
        let t = Tensor::from_candle(&c.t().unwrap()).unwrap();
        assert_eq!(t.shape(), &[3, 2]);
        assert_eq!(t.as_slice::<f32>().unwrap(), &[0.0, 3.0, 1.0, 4.0, 2.0, 5.0]);
        let u = candle_core::Tensor::new(&[1u32, 2], &candle_core::Device::Cpu).unwrap();
        assert!(matches!(Tensor::from_candle(&u), Err(Error::Unsupported(_))));
    }
}
