//! Classifier-free guidance (Ho & Salimans 2022) and its helpers.

use burn::tensor::Tensor;
use burn::tensor::backend::Backend;

/// `uncond + scale * (cond - uncond)` (Ho & Salimans 2022, eq. 6).
///
/// # Shapes
///
/// - uncond, cond, output: `[batch, channels, height, width]`
pub fn classifier_free_guidance<B: Backend>(
    uncond: Tensor<B, 4>,
    cond: Tensor<B, 4>,
    scale: f64,
) -> Tensor<B, 4> {
    uncond.clone().add(cond.sub(uncond).mul_scalar(scale))
}

/// Rescales a guided prediction towards the standard deviation of the conditional one
/// (Lin et al. 2023, §3.4, "Common Diffusion Noise Schedules and Sample Steps are Flawed"):
/// `phi * guided * std(cond) / std(guided) + (1 - phi) * guided`, with per-sample unbiased
/// standard deviations as diffusers' `rescale_noise_cfg`.
///
/// # Shapes
///
/// - guided, cond, output: `[batch, channels, height, width]`
pub fn rescale_guidance<B: Backend>(
    guided: Tensor<B, 4>,
    cond: Tensor<B, 4>,
    phi: f64,
) -> Tensor<B, 4> {
    let std_cond = per_sample_std(cond);
    let std_guided = per_sample_std(guided.clone());
    let rescaled = guided.clone().mul(std_cond.div(std_guided));
    rescaled.mul_scalar(phi).add(guided.mul_scalar(1.0 - phi))
}

/// Unbiased standard deviation over all but the first dimension, shaped `[batch, 1, 1, 1]`.
fn per_sample_std<B: Backend>(x: Tensor<B, 4>) -> Tensor<B, 4> {
    let [b, c, h, w] = x.dims();
    let n = c * h * w;
    let flat = x.reshape([b, n]);
    let mean = flat.clone().mean_dim(1);
    let var = flat
        .sub(mean)
        .powf_scalar(2.0)
        .sum_dim(1)
        .div_scalar((n.max(2) - 1) as f64);
    var.sqrt().reshape([b, 1, 1, 1])
}

/// LCM's guidance-scale embedding (diffusers' `get_guidance_scale_embedding`): sinusoidal
/// features of `w * 1000`, `[sin, cos]` halves, zero-padded to an odd `dim`.
pub fn guidance_scale_embedding(w: &[f64], dim: usize) -> Vec<f32> {
    let half = dim / 2;
    let step = if half > 1 {
        (10000f64).ln() / (half - 1) as f64
    } else {
        0.0
    };
    let mut out = Vec::with_capacity(w.len() * dim);
    for &wi in w {
        let x = wi * 1000.0;
        let freqs: Vec<f64> = (0..half).map(|i| (-(i as f64) * step).exp() * x).collect();
        out.extend(freqs.iter().map(|f| f.sin() as f32));
        out.extend(freqs.iter().map(|f| f.cos() as f32));
        if dim % 2 == 1 {
            out.push(0.0);
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use burn::backend::NdArray;

    type B = NdArray<f32>;

    #[test]
    fn guidance_extrapolates_and_rescale_matches_formula() {
        let device = Default::default();
        let u = Tensor::<B, 4>::from_floats([[[[0.0, 1.0], [2.0, 3.0]]]], &device);
        let c = Tensor::<B, 4>::from_floats([[[[1.0, 1.0], [4.0, 3.0]]]], &device);
        let g = classifier_free_guidance(u, c.clone(), 2.0);
        assert_eq!(
            g.to_data().to_vec::<f32>().unwrap(),
            vec![2.0, 1.0, 6.0, 3.0]
        );
        // std(c) (unbiased) = sqrt(5/3 * 1.5) ..., check phi = 1 gives std(result) = std(c)
        let r = rescale_guidance(g, c.clone(), 1.0);
        let sr = per_sample_std(r).into_scalar();
        let sc = per_sample_std(c).into_scalar();
        assert!((sr - sc).abs() < 1e-5, "{sr} vs {sc}");
    }

    #[test]
    fn lcm_embedding_shape_and_values() {
        let e = guidance_scale_embedding(&[0.0, 7.5], 5);
        assert_eq!(e.len(), 10);
        assert_eq!(&e[0..5], &[0.0, 0.0, 1.0, 1.0, 0.0]);
        assert!((e[5] - (7500f64).sin() as f32).abs() < 1e-6);
    }
}
