//! Global-norm gradient clipping, as PyTorch's `clip_grad_norm_` (Burn's own clipping
//! works per parameter). Accumulation uses `burn::optim::GradientsAccumulator`.

use burn::module::{AutodiffModule, ModuleVisitor, Param, ParamId};
use burn::optim::GradientsParams;
use burn::tensor::backend::AutodiffBackend;
use burn::tensor::{ElementConversion, Tensor};

struct Ids {
    ids: Vec<(ParamId, usize)>,
}

impl<B: AutodiffBackend> ModuleVisitor<B> for Ids {
    fn visit_float<const D: usize>(&mut self, param: &Param<Tensor<B, D>>) {
        self.ids.push((param.id, D));
    }
}

fn float_param_ids<B: AutodiffBackend, M: AutodiffModule<B>>(module: &M) -> Vec<(ParamId, usize)> {
    let mut v = Ids { ids: Vec::new() };
    module.visit(&mut v);
    v.ids
}

fn with_rank<B: AutodiffBackend, R>(
    grads: &mut GradientsParams,
    id: ParamId,
    rank: usize,
    f: &mut dyn FnMut(&mut GradientsParams, ParamId, Dyn<B>) -> R,
) -> Option<R> {
    macro_rules! go {
        ($d:literal) => {
            grads
                .get::<B::InnerBackend, $d>(id)
                .map(|t| Dyn::<B>::from(t))
                .map(|t| f(grads, id, t))
        };
    }
    match rank {
        1 => go!(1),
        2 => go!(2),
        3 => go!(3),
        4 => go!(4),
        5 => go!(5),
        6 => go!(6),
        _ => None,
    }
}

/// A gradient of any rank, flattened.
struct Dyn<B: AutodiffBackend> {
    flat: Tensor<B::InnerBackend, 1>,
    dims: Vec<usize>,
}

impl<B: AutodiffBackend, const D: usize> From<Tensor<B::InnerBackend, D>> for Dyn<B> {
    fn from(t: Tensor<B::InnerBackend, D>) -> Self {
        let dims = t.dims().to_vec();
        let n: usize = dims.iter().product();
        Self {
            flat: t.reshape([n]),
            dims,
        }
    }
}

fn register<B: AutodiffBackend>(grads: &mut GradientsParams, id: ParamId, g: Dyn<B>) {
    macro_rules! put {
        ($d:literal) => {{
            let dims: [usize; $d] = g.dims.clone().try_into().expect("rank checked");
            grads.register::<B::InnerBackend, $d>(id, g.flat.reshape(dims));
        }};
    }
    match g.dims.len() {
        1 => put!(1),
        2 => put!(2),
        3 => put!(3),
        4 => put!(4),
        5 => put!(5),
        6 => put!(6),
        r => unreachable!("rank {r} gradients are never read"),
    }
}

/// The global L2 norm of all gradients of `module`'s float parameters.
pub fn grad_norm<B: AutodiffBackend, M: AutodiffModule<B>>(
    module: &M,
    grads: &mut GradientsParams,
) -> f64 {
    // Sums of squares stay on the device; one read-back for the whole model.
    let mut squares: Vec<Tensor<B::InnerBackend, 1>> = Vec::new();
    for (id, rank) in float_param_ids::<B, M>(module) {
        if let Some(sq) =
            with_rank::<B, Tensor<B::InnerBackend, 1>>(grads, id, rank, &mut |_, _, g| {
                g.flat.powf_scalar(2.0).sum()
            })
        {
            squares.push(sq);
        }
    }
    if squares.is_empty() {
        return 0.0;
    }
    Tensor::cat(squares, 0)
        .sum()
        .into_scalar()
        .elem::<f64>()
        .sqrt()
}

/// Scales all gradients so their global norm is at most `max_norm`; returns the norm before
/// clipping (PyTorch's `clip_grad_norm_`: scale = max_norm / (norm + 1e-6) when above).
pub fn clip_grad_norm<B: AutodiffBackend, M: AutodiffModule<B>>(
    module: &M,
    grads: &mut GradientsParams,
    max_norm: f64,
) -> f64 {
    let norm = grad_norm::<B, M>(module, grads);
    let scale = max_norm / (norm + 1e-6);
    if scale < 1.0 {
        scale_grads::<B, M>(module, grads, scale);
    }
    norm
}

/// Multiplies every gradient of `module` by `factor`.
pub fn scale_grads<B: AutodiffBackend, M: AutodiffModule<B>>(
    module: &M,
    grads: &mut GradientsParams,
    factor: f64,
) {
    for (id, rank) in float_param_ids::<B, M>(module) {
        with_rank::<B, ()>(grads, id, rank, &mut |grads, id, g| {
            let scaled = Dyn::<B> {
                flat: g.flat.mul_scalar(factor),
                dims: g.dims,
            };
            register::<B>(grads, id, scaled);
        });
    }
}
