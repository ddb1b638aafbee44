//! Burn tensors as [`SchedulerTensor`]s, so samplers run on the device holding the latents.
//!
//! [`BurnTensor`] wraps a float [`Tensor`]; every [`SchedulerTensor`] operation maps to one or
//! two Burn ops and stays on the tensor's device in the tensor's float dtype. Only
//! [`SchedulerTensor::to_host`] reads the values back.
//!
//! ```
//! use burn::backend::NdArray;
//! use burn::tensor::Tensor;
//! use diffusion_core::SchedulerTensor;
//! use diffusion_models::tensor::BurnTensor;
//!
//! let device = Default::default();
//! let latent = BurnTensor(Tensor::<NdArray<f32>, 4>::ones([2, 4, 8, 8], &device));
//! let scaled = latent.scale_batch(&[0.5, 2.0]);
//! assert_eq!(scaled.to_host()[0], 0.5);
//! ```

use burn::tensor::backend::Backend;
use burn::tensor::{Shape, Tensor, TensorData};
use diffusion_core::{Error, HostTensor, Result, SchedulerTensor};

/// A Burn float tensor of rank `D` usable by the samplers of `diffusion-schedulers`.
///
/// Dimension 0 is the batch dimension and dimension 1 the channel dimension, as
/// [`SchedulerTensor`] requires, so `D` must be at least 2 for
/// [`SchedulerTensor::split_channels`] and at least 1 for [`SchedulerTensor::scale_batch`].
#[derive(Debug, Clone)]
pub struct BurnTensor<B: Backend, const D: usize>(pub Tensor<B, D>);

impl<B: Backend, const D: usize> BurnTensor<B, D> {
    /// Wraps a Burn tensor.
    pub fn new(tensor: Tensor<B, D>) -> Self {
        Self(tensor)
    }

    /// The wrapped Burn tensor.
    pub fn into_inner(self) -> Tensor<B, D> {
        self.0
    }

    /// A reference to the wrapped Burn tensor.
    pub fn inner(&self) -> &Tensor<B, D> {
        &self.0
    }

    /// Uploads a [`HostTensor`] to `device` in the device's default float dtype.
    ///
    /// Fails with [`Error::Shape`] when the host tensor's rank is not `D`.
    pub fn from_host(host: &HostTensor, device: &B::Device) -> Result<Self> {
        let shape = host.shape();
        check_rank::<D>(&shape)?;
        let data = TensorData::new(host.data().to_vec(), Shape::from(shape));
        Ok(Self(Tensor::from_data(data, device)))
    }

    /// Copies the values to a [`HostTensor`] (as `f64`).
    pub fn to_host_tensor(&self) -> HostTensor {
        let shape = self.0.dims().to_vec();
        HostTensor::new(self.to_host(), shape)
            .expect("a tensor's element count always matches its shape")
    }
}

impl<B: Backend, const D: usize> From<Tensor<B, D>> for BurnTensor<B, D> {
    fn from(tensor: Tensor<B, D>) -> Self {
        Self(tensor)
    }
}

impl<B: Backend, const D: usize> From<BurnTensor<B, D>> for Tensor<B, D> {
    fn from(tensor: BurnTensor<B, D>) -> Self {
        tensor.0
    }
}

fn check_rank<const D: usize>(shape: &[usize]) -> Result<()> {
    if shape.len() == D {
        Ok(())
    } else {
        Err(Error::Shape(format!(
            "shape {shape:?} has rank {}, expected rank {D}",
            shape.len()
        )))
    }
}

impl<B: Backend, const D: usize> SchedulerTensor for BurnTensor<B, D> {
    fn shape(&self) -> Vec<usize> {
        self.0.dims().to_vec()
    }

    fn add(&self, other: &Self) -> Self {
        assert_eq!(self.0.dims(), other.0.dims(), "BurnTensor shapes differ");
        Self(self.0.clone() + other.0.clone())
    }

    fn sub(&self, other: &Self) -> Self {
        assert_eq!(self.0.dims(), other.0.dims(), "BurnTensor shapes differ");
        Self(self.0.clone() - other.0.clone())
    }

    fn mul(&self, other: &Self) -> Self {
        assert_eq!(self.0.dims(), other.0.dims(), "BurnTensor shapes differ");
        Self(self.0.clone() * other.0.clone())
    }

    fn scale(&self, factor: f64) -> Self {
        Self(self.0.clone().mul_scalar(factor))
    }

    fn add_scalar(&self, value: f64) -> Self {
        Self(self.0.clone().add_scalar(value))
    }

    fn exp(&self) -> Self {
        Self(self.0.clone().exp())
    }

    fn clamp(&self, min: f64, max: f64) -> Self {
        Self(self.0.clone().clamp(min, max))
    }

    fn scale_batch(&self, factors: &[f64]) -> Self {
        let dims = self.0.dims();
        assert!(D >= 1, "scale_batch needs a batch dimension");
        assert_eq!(factors.len(), dims[0], "one factor per batch element");
        let mut shape = [1usize; D];
        shape[0] = dims[0];
        let device = self.0.device();
        let data = TensorData::new(factors.to_vec(), Shape::from(shape.to_vec()));
        let factors = Tensor::<B, D>::from_data(data, (&device, self.0.dtype()));
        Self(self.0.clone() * factors)
    }

    fn split_channels(&self, at: usize) -> (Self, Self) {
        let dims = self.0.dims();
        assert!(D >= 2, "split_channels needs a channel dimension");
        let channels = dims[1];
        assert!(at <= channels, "split at {at} beyond {channels} channels");
        let part = |start: usize, len: usize| {
            if len == 0 {
                let mut shape = dims;
                shape[1] = 0;
                let device = self.0.device();
                let empty = TensorData::new(Vec::<f64>::new(), Shape::from(shape.to_vec()));
                Tensor::<B, D>::from_data(empty, (&device, self.0.dtype()))
            } else {
                self.0.clone().narrow(1, start, len)
            }
        };
        (Self(part(0, at)), Self(part(at, channels - at)))
    }

    fn to_host(&self) -> Vec<f64> {
        self.0.to_data().iter::<f64>().collect()
    }

    fn from_host_like(&self, data: Vec<f64>, shape: &[usize]) -> Self {
        check_rank::<D>(shape).expect("from_host_like: rank must match the tensor's rank");
        let n: usize = shape.iter().product();
        assert_eq!(
            n,
            data.len(),
            "{} values do not fill shape {shape:?}",
            data.len()
        );
        let device = self.0.device();
        let data = TensorData::new(data, Shape::from(shape.to_vec()));
        Self(Tensor::from_data(data, (&device, self.0.dtype())))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use burn::backend::NdArray;
    use burn::tensor::DType;
    use diffusion_core::noise::NoiseSource;

    type B = NdArray<f32>;

    fn host(shape: &[usize], seed: u64) -> HostTensor {
        // A small deterministic LCG so the test needs no RNG crate.
        let n: usize = shape.iter().product();
        let mut state = seed
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        let data = (0..n)
            .map(|_| {
                state = state
                    .wrapping_mul(6364136223846793005)
                    .wrapping_add(1442695040888963407);
                ((state >> 33) as f64 / (1u64 << 31) as f64) * 4.0 - 2.0
            })
            .collect();
        HostTensor::new(data, shape.to_vec()).unwrap()
    }

    fn burn(h: &HostTensor) -> BurnTensor<B, 4> {
        BurnTensor::from_host(h, &Default::default()).unwrap()
    }

    fn assert_close(b: &BurnTensor<B, 4>, h: &HostTensor) {
        assert_eq!(b.shape(), h.shape());
        let got = b.to_host();
        for (i, (g, w)) in got.iter().zip(h.data()).enumerate() {
            let tol = 1e-6 * (1.0 + w.abs());
            assert!((g - w).abs() <= tol, "element {i}: {g} vs {w}");
        }
    }

    #[test]
    fn every_op_matches_host_tensor() {
        let shape = [2, 6, 3, 4];
        let (ha, hb) = (host(&shape, 1), host(&shape, 2));
        let (a, b) = (burn(&ha), burn(&hb));

        assert_close(&a, &ha);
        assert_close(&a.add(&b), &ha.add(&hb));
        assert_close(&a.sub(&b), &ha.sub(&hb));
        assert_close(&a.mul(&b), &ha.mul(&hb));
        assert_close(&a.scale(-0.37), &ha.scale(-0.37));
        assert_close(&a.add_scalar(1.25), &ha.add_scalar(1.25));
        assert_close(&a.exp(), &ha.exp());
        assert_close(&a.clamp(-0.5, 0.75), &ha.clamp(-0.5, 0.75));
        assert_close(&a.scale_batch(&[0.5, -3.0]), &ha.scale_batch(&[0.5, -3.0]));
        let terms = [(0.3, &a), (-1.7, &b)];
        let host_terms = [(0.3, &ha), (-1.7, &hb)];
        assert_close(
            &BurnTensor::lincomb(&terms),
            &HostTensor::lincomb(&host_terms),
        );
        for at in [0, 1, 3, 6] {
            let (lo, hi) = a.split_channels(at);
            let (hlo, hhi) = ha.split_channels(at);
            assert_close(&lo, &hlo);
            assert_close(&hi, &hhi);
        }
        let rebuilt = a.from_host_like(hb.data().to_vec(), &shape);
        assert_close(&rebuilt, &hb);
        assert_eq!(
            a.to_host_tensor(),
            HostTensor::new(a.to_host(), shape.to_vec()).unwrap()
        );
    }

    #[test]
    fn noise_like_draws_host_noise() {
        struct Counting(f64);
        impl NoiseSource for Counting {
            fn sample(&mut self, shape: &[usize]) -> Result<Vec<f64>> {
                let n: usize = shape.iter().product();
                Ok((0..n)
                    .map(|_| {
                        self.0 += 1.0;
                        self.0
                    })
                    .collect())
            }
        }
        let a = burn(&host(&[1, 2, 2, 2], 3));
        let noise = a.noise_like(&mut Counting(0.0)).unwrap();
        assert_eq!(noise.to_host(), (1..=8).map(f64::from).collect::<Vec<_>>());
        assert_eq!(noise.shape(), vec![1, 2, 2, 2]);
    }

    #[test]
    fn keeps_dtype_and_checks_rank() {
        let device = Default::default();
        let t = BurnTensor(Tensor::<B, 2>::ones([2, 3], &device).cast(DType::F64));
        assert_eq!(t.0.dtype(), DType::F64);
        let u = t.from_host_like(vec![1.0; 4], &[2, 2]);
        assert_eq!(u.0.dtype(), DType::F64);
        assert_eq!(t.scale_batch(&[1.0, 2.0]).0.dtype(), DType::F64);
        let (lo, _) = t.split_channels(0);
        assert_eq!(lo.shape(), vec![2, 0]);
        let h = HostTensor::zeros(vec![2, 3, 4]);
        assert!(matches!(
            BurnTensor::<B, 2>::from_host(&h, &device),
            Err(Error::Shape(_))
        ));
        let roundtrip: Tensor<B, 2> =
            BurnTensor::from(Tensor::<B, 2>::zeros([1, 1], &device)).into();
        assert_eq!(roundtrip.dims(), [1, 1]);
    }
}
