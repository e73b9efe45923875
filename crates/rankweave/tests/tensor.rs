//! The tensor type and tensor dicts through the public API.

use rankweave::tensor::{Device, Tensor, TensorDict, TensorDictValue, Value};
use rankweave::{DType, Error};

fn iota(shape: &[usize]) -> Tensor {
    let n: usize = shape.iter().product();
    Tensor::from_vec((0..n as i64).collect::<Vec<_>>(), shape.to_vec()).unwrap()
}

#[test]
fn all_gather_epilogue_matches_seed_movedim_reshape() {
    // What GroupCoordinator::all_gather does with a (world, *input) buffer:
    // movedim(0, dim) then reshape with dim multiplied by world.
    let world = 3;
    let input = [2usize, 3, 4];
    let blocks: Vec<Tensor> = (0..world)
        .map(|r| {
            let n: usize = input.iter().product();
            Tensor::from_vec((0..n as i64).map(|i| r as i64 * 1000 + i).collect::<Vec<_>>(), input.to_vec()).unwrap()
        })
        .collect();
    let refs: Vec<&Tensor> = blocks.iter().collect();
    let stacked = Tensor::cat(&refs, 0).unwrap().into_shape([world, 2, 3, 4]).unwrap();
    for dim in [0isize, 1, 2, -1, -2, -3] {
        let d = if dim < 0 { dim + 3 } else { dim } as usize;
        let mut expect_shape = input.to_vec();
        expect_shape[d] *= world;
        let by_movedim = stacked.movedim(0, d as isize).unwrap().into_shape(expect_shape.clone()).unwrap();
        let by_cat = Tensor::cat(&refs, dim).unwrap();
        assert_eq!(by_movedim, by_cat, "dim {dim}");
        assert_eq!(stacked.clone().unstack_into_dim(d).unwrap(), by_cat, "dim {dim}");
        assert_eq!(by_cat.shape(), expect_shape.as_slice());
    }
    // Spot values: along the last dim, rank 1's block follows rank 0's.
    let last = Tensor::cat(&refs, -1).unwrap();
    assert_eq!(&last.as_slice::<i64>().unwrap()[..12], &[0, 1, 2, 3, 1000, 1001, 1002, 1003, 2000, 2001, 2002, 2003]);
}

#[test]
fn slicing_for_the_all_gather_group() {
    // send_tensor_dict sends reshape(k, -1)[r]; the receiver all-gathers dim 0.
    let t = iota(&[4, 6]);
    let k = 3;
    let parts: Vec<Tensor> = (0..k).map(|r| t.reshape(&[k as isize, -1]).unwrap().select(0, r).unwrap()).collect();
    assert_eq!(parts[1].shape(), &[8]);
    assert_eq!(parts[1].as_slice::<i64>().unwrap(), &[8, 9, 10, 11, 12, 13, 14, 15]);
    let refs: Vec<&Tensor> = parts.iter().collect();
    assert_eq!(Tensor::cat(&refs, 0).unwrap().into_shape([4, 6]).unwrap(), t);
}

#[test]
fn reshape_errors_say_what_was_expected() {
    let t = iota(&[2, 3]);
    let e = t.reshape(&[4, -1]).unwrap_err().to_string();
    assert!(e.contains("shape [2, 3]") && e.contains("6 elements") && e.contains("[4, -1]"), "{e}");
    let e = t.narrow(0, 1, 5).unwrap_err().to_string();
    assert!(e.contains("expected start + len <= 2"), "{e}");
    let e = Tensor::cat(&[&t, &iota(&[3, 3])], 1).unwrap_err().to_string();
    assert!(e.contains("tensor 1"), "{e}");
}

#[test]
fn every_dtype_has_typed_views() {
    for dt in DType::ALL {
        let t = Tensor::from_f64(&[0.0, 1.0, 2.0, 3.0, 4.0, 5.0], [2, 3], dt).unwrap();
        assert_eq!(t.dtype(), dt);
        assert_eq!(t.nbytes(), 6 * dt.size());
        assert_eq!(t.numel(), 6);
        let moved = t.movedim(1, 0).unwrap();
        assert_eq!(moved.to_f64_vec().unwrap(), vec![0.0, 3.0, 1.0, 4.0, 2.0, 5.0], "{dt}");
        assert_eq!(Tensor::from_bytes(t.as_bytes().unwrap(), [3, 2], dt).unwrap(), t.reshape(&[3, 2]).unwrap());
    }
    let t = Tensor::from_vec(vec![i64::MAX, -1], [2]).unwrap();
    assert_eq!(t.as_slice::<i64>().unwrap(), &[i64::MAX, -1]);
    assert!(matches!(t.as_slice::<f64>(), Err(Error::InvalidArgument(_))));
}

#[test]
fn devices_other_than_cpu_are_refused() {
    assert!(matches!(Tensor::zeros_on([2], DType::F32, Device::Cuda(1)), Err(Error::Unsupported(_))));
    assert_eq!(Device::Cuda(1).to_string(), "cuda:1");
    assert_eq!(Device::Cpu.type_name(), "cpu");
    assert!(iota(&[1]).to_device(Device::Cpu).unwrap().is_cpu());
}

#[test]
fn tensor_dict_mixed_entries() {
    let mut d: TensorDict =
        [("a", TensorDictValue::from(1i64)), ("b", Tensor::vec1(&[1u8, 2]).into())].into_iter().collect();
    d.insert("c", Value::List(vec!["x".into(), Value::None, 2.5f64.into()]));
    d.insert("empty", Tensor::zeros([0, 4], DType::BF16).unwrap());
    assert_eq!(d.keys().collect::<Vec<_>>(), ["a", "b", "c", "empty"]);
    assert_eq!(d.tensors().count(), 2);
    let (meta, tensors) = d.split();
    assert_eq!(meta.len(), 4);
    assert_eq!(tensors[1].shape(), &[0, 4]);
    let entries = d.clone().into_entries();
    assert_eq!(entries[0].0, "a");
    assert_eq!(d.into_iter().count(), 4);
}

#[cfg(feature = "ndarray")]
#[test]
fn ndarray_round_trip() {
    let a = ndarray::Array::from_shape_vec((2, 2, 2), (0..8).map(|x| x as f64).collect()).unwrap();
    let t = Tensor::from(&a);
    assert_eq!(t.shape(), &[2, 2, 2]);
    let b: ndarray::ArrayD<f64> = (&t).try_into().unwrap();
    assert_eq!(b, a.into_dyn());
}

mod props {
    use super::*;
    use proptest::prelude::*;

    fn shaped() -> impl Strategy<Value = (Vec<usize>, usize)> {
        prop::collection::vec(0usize..5, 1..5).prop_flat_map(|shape| {
            let nd = shape.len();
            (Just(shape), 0..nd)
        })
    }

    proptest! {
        #[test]
        fn narrow_then_cat_is_identity((shape, d) in shaped(), cut in 0usize..5) {
            let t = iota(&shape);
            let cut = cut.min(shape[d]);
            let a = t.narrow(d as isize, 0, cut).unwrap();
            let b = t.narrow(d as isize, cut, shape[d] - cut).unwrap();
            prop_assert_eq!(Tensor::cat(&[&a, &b], d as isize).unwrap(), t);
        }

        #[test]
        fn movedim_round_trips((shape, s) in shaped(), d in 0usize..4) {
            let t = iota(&shape);
            let d = d % shape.len();
            let m = t.movedim(s as isize, d as isize).unwrap();
            prop_assert_eq!(m.shape()[d], shape[s]);
            prop_assert_eq!(m.movedim(d as isize, s as isize).unwrap(), t);
        }

        #[test]
        fn gathered_layout_equals_cat((shape, d) in shaped(), world in 1usize..4) {
            let blocks: Vec<Tensor> = (0..world)
                .map(|r| {
                    let n: usize = shape.iter().product();
                    Tensor::from_vec((0..n as i64).map(|i| i + 100 * r as i64).collect::<Vec<_>>(), shape.clone()).unwrap()
                })
                .collect();
            let refs: Vec<&Tensor> = blocks.iter().collect();
            let mut stacked_shape = vec![world];
            stacked_shape.extend_from_slice(&shape);
            let stacked = Tensor::cat(&refs, 0).unwrap().into_shape(stacked_shape).unwrap();
            prop_assert_eq!(stacked.unstack_into_dim(d).unwrap(), Tensor::cat(&refs, d as isize).unwrap());
        }
    }
}

#[test]
fn storage_is_host_memory_reached_through_methods() {
    use rankweave::tensor::{HostBuffer, Storage};
    let t = Tensor::from_vec(vec![1.5f64, -2.0, 3.0], [3]).unwrap();
    assert_eq!(t.device(), Device::Cpu);
    assert_eq!(t.storage().device(), Device::Cpu);
    assert_eq!(t.storage().nbytes(), 24);
    assert!(matches!(t.storage(), Storage::Host(h) if h.len() == 24));
    assert_eq!(t.as_bytes().unwrap(), t.storage().host_bytes().unwrap());
    assert_eq!(&t.as_bytes().unwrap()[..8], &1.5f64.to_le_bytes());
    let mut z = Tensor::zeros([2, 2], DType::I32).unwrap();
    z.as_bytes_mut().unwrap()[0] = 7;
    assert_eq!(z.to_vec::<i32>().unwrap(), vec![7, 0, 0, 0]);
    assert!(HostBuffer::try_zeroed(0).unwrap().is_empty());
    assert_eq!(HostBuffer::from_bytes(&[1, 2, 3]).as_bytes(), &[1, 2, 3]);
}

#[test]
fn sizes_that_do_not_fit_in_memory_are_errors() {
    // 4 EiB: the byte count fits in usize, the allocation cannot succeed.
    let e = Tensor::zeros([1usize << 62], DType::U8).unwrap_err();
    assert!(matches!(e, Error::OutOfMemory { bytes, .. } if bytes == 1 << 62), "{e}");
    let msg = e.to_string();
    assert!(msg.contains("4611686018427387904 bytes") && msg.contains("shape [4611686018427387904]"), "{msg}");
    let e = rankweave::tensor::HostBuffer::try_zeroed(usize::MAX).unwrap_err();
    assert!(matches!(e, Error::OutOfMemory { .. }), "{e}");
}

#[test]
fn large_host_buffers_lie_on_huge_pages_and_behave_like_any_other() {
    use rankweave::tensor::{HostBuffer, HUGE_PAGE_MIN};
    // RANKWEAVE_HUGE_PAGES=0 turns the policy off; the rest holds either way.
    let on = !matches!(std::env::var("RANKWEAVE_HUGE_PAGES").as_deref(), Ok("0" | "off" | "no" | "false"));
    let small = HostBuffer::try_zeroed(HUGE_PAGE_MIN - 1).unwrap();
    assert!(!small.on_huge_pages());
    let len = HUGE_PAGE_MIN + 4096 + 5;
    let mut big = HostBuffer::try_zeroed(len).unwrap();
    assert_eq!(big.on_huge_pages(), on);
    if on {
        assert_eq!(big.as_bytes().as_ptr() as usize % (2 << 20), 0, "a huge page boundary");
    }
    assert_eq!(big.len(), len);
    assert!(big.as_bytes().iter().all(|&b| b == 0));
    for (i, b) in big.as_bytes_mut().iter_mut().enumerate() {
        *b = (i % 251) as u8;
    }
    let mut copy = big.clone();
    assert_eq!(copy.on_huge_pages(), on);
    assert_eq!(copy.as_bytes(), big.as_bytes());
    copy.as_bytes_mut()[len - 1] ^= 0xff;
    assert_ne!(copy.as_bytes()[len - 1], big.as_bytes()[len - 1], "a clone shares no bytes with its source");
    let from = HostBuffer::from_bytes(big.as_bytes());
    assert_eq!((from.on_huge_pages(), from.as_bytes()), (on, big.as_bytes()));
    // Asked for, huge pages whatever the size; the tail past `len` reads zero.
    let tiny = HostBuffer::try_zeroed_huge(13).unwrap();
    assert!(tiny.on_huge_pages() && tiny.len() == 13 && tiny.as_bytes().iter().all(|&b| b == 0));
    assert!(HostBuffer::try_zeroed_huge(0).unwrap().is_empty());
    // A typed view of a huge-page tensor (8-byte aligned like any other).
    let t = Tensor::zeros([HUGE_PAGE_MIN / 8 + 1], DType::F64).unwrap();
    assert_eq!(t.to_vec::<f64>().unwrap().len(), HUGE_PAGE_MIN / 8 + 1);
    let e = HostBuffer::try_zeroed_huge(usize::MAX).unwrap_err();
    assert!(matches!(e, Error::OutOfMemory { .. }), "{e}");
}
