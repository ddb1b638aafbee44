//! The tensor abstraction samplers are written against.
//!
//! A [`SchedulerTensor`] is anything a sampler can combine linearly: plain host arrays
//! ([`HostTensor`], used by tests and tools) or device tensors (the Burn wrapper in
//! `diffusion-models`). Samplers never copy the latent to the host on their hot path; only
//! rare operations such as dynamic thresholding go through [`SchedulerTensor::to_host`].

use crate::error::{Error, Result};
use crate::noise::NoiseSource;

/// Elementwise arithmetic a sampler needs from a latent tensor.
///
/// Dimension 0 is the batch dimension and dimension 1 the channel dimension.
pub trait SchedulerTensor: Clone {
    /// The tensor's shape.
    fn shape(&self) -> Vec<usize>;
    /// `self + other`, elementwise.
    fn add(&self, other: &Self) -> Self;
    /// `self - other`, elementwise.
    fn sub(&self, other: &Self) -> Self;
    /// `self * other`, elementwise.
    fn mul(&self, other: &Self) -> Self;
    /// `self * factor`.
    fn scale(&self, factor: f64) -> Self;
    /// `self + value`.
    fn add_scalar(&self, value: f64) -> Self;
    /// `exp(self)`, elementwise.
    fn exp(&self) -> Self;
    /// Elementwise clamp into `[min, max]`.
    fn clamp(&self, min: f64, max: f64) -> Self;
    /// Multiplies batch element `i` by `factors[i]` (`factors.len()` equals the batch size).
    fn scale_batch(&self, factors: &[f64]) -> Self;
    /// Splits along dimension 1 into channels `[0, at)` and `[at, C)`.
    fn split_channels(&self, at: usize) -> (Self, Self);
    /// Copies the values to the host as `f64`, row-major.
    fn to_host(&self) -> Vec<f64>;
    /// A tensor of this kind (same device and dtype) holding `data` with `shape`.
    #[allow(clippy::wrong_self_convention)]
    fn from_host_like(&self, data: Vec<f64>, shape: &[usize]) -> Self;

    /// `sum_i c_i * t_i`; the terms must be non-empty and of one shape.
    fn lincomb(terms: &[(f64, &Self)]) -> Self {
        let (first, rest) = terms.split_first().expect("lincomb of no terms");
        rest.iter()
            .fold(first.1.scale(first.0), |acc, (c, t)| acc.add(&t.scale(*c)))
    }

    /// Standard-normal noise of this tensor's shape, drawn on the host from `noise`.
    fn noise_like(&self, noise: &mut dyn NoiseSource) -> Result<Self> {
        let shape = self.shape();
        let data = noise.sample(&shape)?;
        Ok(self.from_host_like(data, &shape))
    }
}

/// A row-major `f64` array on the host: the reference [`SchedulerTensor`].
#[derive(Debug, Clone, PartialEq)]
pub struct HostTensor {
    data: Vec<f64>,
    shape: Vec<usize>,
}

impl HostTensor {
    /// Wraps `data` with `shape`; the element count must match.
    pub fn new(data: Vec<f64>, shape: Vec<usize>) -> Result<Self> {
        let n: usize = shape.iter().product();
        if n != data.len() {
            return Err(Error::Shape(format!(
                "{} values do not fill shape {shape:?} ({n} values)",
                data.len()
            )));
        }
        Ok(Self { data, shape })
    }

    /// A tensor of zeros.
    pub fn zeros(shape: Vec<usize>) -> Self {
        let n = shape.iter().product();
        Self {
            data: vec![0.0; n],
            shape,
        }
    }

    /// The values, row-major.
    pub fn data(&self) -> &[f64] {
        &self.data
    }

    /// Consumes the tensor, returning its values.
    pub fn into_data(self) -> Vec<f64> {
        self.data
    }

    /// Applies `f` to every element.
    pub fn map(&self, f: impl Fn(f64) -> f64) -> Self {
        Self {
            data: self.data.iter().map(|&x| f(x)).collect(),
            shape: self.shape.clone(),
        }
    }

    fn zip(&self, other: &Self, f: impl Fn(f64, f64) -> f64) -> Self {
        assert_eq!(self.shape, other.shape, "HostTensor shapes differ");
        Self {
            data: self
                .data
                .iter()
                .zip(&other.data)
                .map(|(&a, &b)| f(a, b))
                .collect(),
            shape: self.shape.clone(),
        }
    }
}

impl SchedulerTensor for HostTensor {
    fn shape(&self) -> Vec<usize> {
        self.shape.clone()
    }
    fn add(&self, other: &Self) -> Self {
        self.zip(other, |a, b| a + b)
    }
    fn sub(&self, other: &Self) -> Self {
        self.zip(other, |a, b| a - b)
    }
    fn mul(&self, other: &Self) -> Self {
        self.zip(other, |a, b| a * b)
    }
    fn scale(&self, factor: f64) -> Self {
        self.map(|x| x * factor)
    }
    fn add_scalar(&self, value: f64) -> Self {
        self.map(|x| x + value)
    }
    fn exp(&self) -> Self {
        self.map(f64::exp)
    }
    fn clamp(&self, min: f64, max: f64) -> Self {
        self.map(|x| x.clamp(min, max))
    }
    fn scale_batch(&self, factors: &[f64]) -> Self {
        let batch = self.shape.first().copied().unwrap_or(1);
        assert_eq!(factors.len(), batch, "one factor per batch element");
        let per = self.data.len() / batch.max(1);
        let data = self
            .data
            .iter()
            .enumerate()
            .map(|(i, &x)| x * factors[i / per.max(1)])
            .collect();
        Self {
            data,
            shape: self.shape.clone(),
        }
    }
    fn split_channels(&self, at: usize) -> (Self, Self) {
        assert!(self.shape.len() >= 2 && at <= self.shape[1]);
        let (b, c) = (self.shape[0], self.shape[1]);
        let inner: usize = self.shape[2..].iter().product();
        let mut lo = Vec::with_capacity(b * at * inner);
        let mut hi = Vec::with_capacity(b * (c - at) * inner);
        for chunk in self.data.chunks(c * inner) {
            lo.extend_from_slice(&chunk[..at * inner]);
            hi.extend_from_slice(&chunk[at * inner..]);
        }
        let mut lo_shape = self.shape.clone();
        lo_shape[1] = at;
        let mut hi_shape = self.shape.clone();
        hi_shape[1] = c - at;
        (
            Self {
                data: lo,
                shape: lo_shape,
            },
            Self {
                data: hi,
                shape: hi_shape,
            },
        )
    }
    fn to_host(&self) -> Vec<f64> {
        self.data.clone()
    }
    fn from_host_like(&self, data: Vec<f64>, shape: &[usize]) -> Self {
        Self {
            data,
            shape: shape.to_vec(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn host_tensor_arithmetic() {
        let a = HostTensor::new(vec![1.0, 2.0, 3.0, 4.0], vec![2, 2]).unwrap();
        let b = a.scale(2.0);
        assert_eq!(b.data(), &[2.0, 4.0, 6.0, 8.0]);
        let c = HostTensor::lincomb(&[(1.0, &a), (-0.5, &b)]);
        assert_eq!(c.data(), &[0.0; 4]);
        assert_eq!(a.scale_batch(&[1.0, 10.0]).data(), &[1.0, 2.0, 30.0, 40.0]);
        let (lo, hi) = a.split_channels(1);
        assert_eq!(lo.data(), &[1.0, 3.0]);
        assert_eq!(hi.data(), &[2.0, 4.0]);
        assert_eq!(hi.shape(), vec![2, 1]);
        assert!(HostTensor::new(vec![1.0], vec![2]).is_err());
    }
}
