//! Exponential moving average of model weights (Polyak averaging), as diffusers'
//! `EMAModel`: `ema = decay * ema + (1 - decay) * current` after each optimizer step.

use burn::module::{Module, ModuleMapper, ModuleVisitor, Param};
use burn::tensor::Tensor;
use burn::tensor::backend::Backend;

/// An exponential moving average of a module's float parameters.
#[derive(Debug, Clone)]
pub struct Ema<M> {
    model: M,
    decay: f64,
    updates: usize,
}

impl<M> Ema<M> {
    /// Starts the average from `model` (usually the inference copy of the trained model).
    pub fn new(model: M, decay: f64) -> Self {
        Self {
            model,
            decay,
            updates: 0,
        }
    }

    /// The averaged model.
    pub fn model(&self) -> &M {
        &self.model
    }

    /// Consumes the average, returning the averaged model.
    pub fn into_model(self) -> M {
        self.model
    }

    /// The decay rate.
    pub fn decay(&self) -> f64 {
        self.decay
    }

    /// How many updates have been applied.
    pub fn updates(&self) -> usize {
        self.updates
    }

    /// Restores an average saved in a checkpoint.
    pub fn restore(model: M, decay: f64, updates: usize) -> Self {
        Self {
            model,
            decay,
            updates,
        }
    }
}

impl<M> Ema<M> {
    /// Moves the average towards `current` (same module structure, same backend).
    pub fn update<B: Backend>(&mut self, current: &M)
    where
        M: Module<B>,
    {
        let mut collect = Collect::<B> {
            tensors: Vec::new(),
        };
        current.visit(&mut collect);
        let mut mix = Mix::<B> {
            tensors: collect.tensors.into_iter(),
            decay: self.decay,
        };
        self.model = self.model.clone().map(&mut mix);
        self.updates += 1;
    }
}

/// Forces every lazily initialised parameter of `module` to take its value now.
///
/// Burn initialises parameters on first use, and a clone of a not-yet-initialised module
/// initialises separately (with different random values). Call this before cloning a
/// freshly built model (e.g. to start an EMA from it) so that all copies share weights.
pub fn materialize<B: Backend, M: Module<B>>(module: M) -> M {
    struct Touch;
    impl<B: Backend> ModuleMapper<B> for Touch {
        fn map_float<const D: usize>(&mut self, param: Param<Tensor<B, D>>) -> Param<Tensor<B, D>> {
            param.map(|t| t)
        }
    }
    module.map(&mut Touch)
}

struct Collect<B: Backend> {
    tensors: Vec<Tensor<B, 1>>,
}

impl<B: Backend> ModuleVisitor<B> for Collect<B> {
    fn visit_float<const D: usize>(&mut self, param: &Param<Tensor<B, D>>) {
        let t = param.val();
        let n = t.shape().num_elements();
        self.tensors.push(t.reshape([n]));
    }
}

struct Mix<B: Backend> {
    tensors: std::vec::IntoIter<Tensor<B, 1>>,
    decay: f64,
}

impl<B: Backend> ModuleMapper<B> for Mix<B> {
    fn map_float<const D: usize>(&mut self, param: Param<Tensor<B, D>>) -> Param<Tensor<B, D>> {
        let current = self
            .tensors
            .next()
            .expect("EMA model and current model have the same parameters");
        let decay = self.decay;
        param.map(|ema| {
            let shape = ema.shape();
            ema.mul_scalar(decay)
                .add(current.reshape(shape).mul_scalar(1.0 - decay))
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use burn::backend::NdArray;
    use burn::nn::{Linear, LinearConfig};

    type B = NdArray<f32>;

    #[test]
    fn ema_moves_towards_current_weights() {
        let device = Default::default();
        let a: Linear<B> = materialize(LinearConfig::new(2, 2).init(&device));
        let b: Linear<B> = LinearConfig::new(2, 2).init(&device);
        let mut ema = Ema::new(a.clone(), 0.75);
        ema.update(&b);
        let got = ema
            .model()
            .weight
            .val()
            .into_data()
            .to_vec::<f32>()
            .unwrap();
        let wa = a.weight.val().into_data().to_vec::<f32>().unwrap();
        let wb = b.weight.val().into_data().to_vec::<f32>().unwrap();
        for i in 0..4 {
            assert!((got[i] - (0.75 * wa[i] + 0.25 * wb[i])).abs() < 1e-6);
        }
        assert_eq!(ema.updates(), 1);
    }
}
