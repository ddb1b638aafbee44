#!/usr/bin/env python3
"""Record diffusers sampler trajectories for the Rust parity tests.

Requirements (pip): diffusers==0.42.1 torch numpy scipy

Run from the repository root:

    python3 scripts/scheduler_reference.py

It writes one fixture per scheduler class to diffusion-schedulers/tests/fixtures/<name>.json
plus schedules.json, and is deterministic: running it twice gives identical files.

Every case runs the toy sampling loop of diffusion-schedulers/src/trace.rs:

    scheduler = Class.from_config(config); scheduler.set_timesteps(...)
    x = sample * init_noise_sigma
    for t in scheduler.timesteps:
        x_in = scheduler.scale_model_input(x, t)
        model_output = 0.8 * x_in * cos(t / 1000) + 0.1 * sin(x_in)
        (learned variance: model_output = cat([model_output, 0.25 * (1 + tanh(x_in))], dim=1))
        x = scheduler.step(model_output, t, x[, eta=eta]).prev_sample

with float64 torch tensors for the sample and model outputs (diffusers keeps its own tables,
such as alphas_cumprod and sigmas, in float32; that is what the fixtures record).

Noise: each scheduler module's `randn_tensor` is replaced by a recorder that draws float64
standard normals from a seeded numpy generator, casts them to the dtype diffusers asked for
and records the values actually used, so the Rust samplers replay identical noise.

float32 measure: every case is also run a second time with the scheduler module's float32
promoted to float64 (its `torch` and `np` globals see float64 for `float32`, and torch's
default dtype is float64), replaying the recorded noise. The largest relative difference
between the two runs is stored per case as `f32_noise`: it measures how far diffusers' own
float32 tables move the result, which is the scale by which an exact float64 port
(ours) may legitimately differ from diffusers. The parity tests derive their tolerances from
it. The float64 twin's schedule and final sample are stored as `expected_f64` for diagnosis.

Fixture format: {"generator", "diffusers_version", "torch_version", "class", "cases": [case]},
each case holding the TraceCase input fields (class, config, num_inference_steps, timesteps,
sigmas, shape, sample, eta, noise), a "name", "expected" (the TraceOutput fields plus
"noise_draws") and "f32_noise" / "expected_f64". Non-finite config values such as
lambda_min_clipped = -inf are written as Python's -Infinity token.
"""

import contextlib
import importlib
import json
import math
import os
import sys
import zlib

import numpy as np
import torch

import diffusers

EXPECTED_DIFFUSERS = "0.42.1"
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
OUT_DIR = os.path.join(ROOT, "diffusion-schedulers", "tests", "fixtures")

# (class name, module, fixture file)
CLASSES = [
    ("DDIMScheduler", "scheduling_ddim", "ddim.json"),
    ("DDPMScheduler", "scheduling_ddpm", "ddpm.json"),
    ("PNDMScheduler", "scheduling_pndm", "pndm.json"),
    ("LCMScheduler", "scheduling_lcm", "lcm.json"),
    ("TCDScheduler", "scheduling_tcd", "tcd.json"),
    ("LMSDiscreteScheduler", "scheduling_lms_discrete", "lms.json"),
    ("EulerDiscreteScheduler", "scheduling_euler_discrete", "euler.json"),
    ("EulerAncestralDiscreteScheduler", "scheduling_euler_ancestral_discrete", "euler_ancestral.json"),
    ("HeunDiscreteScheduler", "scheduling_heun_discrete", "heun.json"),
    ("KDPM2DiscreteScheduler", "scheduling_k_dpm_2_discrete", "kdpm2.json"),
    ("KDPM2AncestralDiscreteScheduler", "scheduling_k_dpm_2_ancestral_discrete", "kdpm2_ancestral.json"),
    ("DPMSolverMultistepScheduler", "scheduling_dpmsolver_multistep", "dpm_solver_multistep.json"),
    ("DPMSolverSinglestepScheduler", "scheduling_dpmsolver_singlestep", "dpm_solver_singlestep.json"),
    ("UniPCMultistepScheduler", "scheduling_unipc_multistep", "unipc.json"),
    ("DEISMultistepScheduler", "scheduling_deis_multistep", "deis.json"),
]

SHAPE = [1, 2, 1, 2]
BATCH_SHAPE = [2, 1, 2, 3]

# Stable Diffusion 1.5's scheduler_config.json, with leading spacing made explicit (the k-diffusion
# family defaults to linspace); converted to each class as a pipeline's from_config does.
SD15 = {
    "_class_name": "PNDMScheduler",
    "_diffusers_version": "0.6.0",
    "beta_end": 0.012,
    "beta_schedule": "scaled_linear",
    "beta_start": 0.00085,
    "clip_sample": False,
    "num_train_timesteps": 1000,
    "set_alpha_to_one": False,
    "skip_prk_steps": True,
    "steps_offset": 1,
    "timestep_spacing": "leading",
    "trained_betas": None,
}

SCALED = {"beta_schedule": "scaled_linear", "beta_start": 0.00085, "beta_end": 0.012}


def case(name, config=None, steps=10, shape=None, eta=None, timesteps=None, sigmas=None, full_config=False):
    """One trace case. Its recorded config holds the keys given here (so the Rust defaults are
    exercised) plus the bookkeeping keys; with full_config, the whole config diffusers saves
    (every key, nulls and -Infinity included), as a model folder's scheduler_config.json has."""
    c = {"name": name, "config": dict(config or {}), "shape": list(shape or SHAPE), "eta": eta,
         "full_config": full_config}
    if timesteps is not None:
        c["timesteps"] = list(timesteps)
    elif sigmas is not None:
        c["sigmas"] = list(sigmas)
    else:
        c["num_inference_steps"] = steps
    return c


def common(preds=("v_prediction", "sample"), spacings=("trailing", "linspace", "leading"),
           offset=True, schedules=("scaled_linear", "squaredcos_cap_v2"), sigma_opts=False,
           final_sigma=False, zero_snr=False, sd15=True):
    """Cases shared by most classes: one per option value."""
    out = [case("default (full saved config)", full_config=True)]
    for p in preds:
        out.append(case(f"prediction_type={p}", {"prediction_type": p}))
    for s in spacings:
        out.append(case(f"timestep_spacing={s}", {"timestep_spacing": s}))
    if offset:
        out.append(case("steps_offset=1 leading", {"steps_offset": 1, "timestep_spacing": "leading"}))
    for b in schedules:
        cfg = dict(SCALED) if b == "scaled_linear" else {"beta_schedule": b}
        out.append(case(f"beta_schedule={b}", cfg))
    if sigma_opts:
        for k in ("use_karras_sigmas", "use_exponential_sigmas", "use_beta_sigmas"):
            out.append(case(f"{k}", {k: True}))
        out.append(case("use_karras_sigmas 25 steps scaled_linear", dict(SCALED, use_karras_sigmas=True), steps=25))
    if final_sigma:
        out.append(case("final_sigmas_type=sigma_min", {"final_sigmas_type": "sigma_min"}))
        if sigma_opts:
            out.append(case("final_sigmas_type=sigma_min karras",
                            {"final_sigmas_type": "sigma_min", "use_karras_sigmas": True}))
    if zero_snr:
        out.append(case("rescale_betas_zero_snr trailing v_prediction",
                        dict(SCALED, rescale_betas_zero_snr=True, timestep_spacing="trailing",
                             prediction_type="v_prediction")))
    out.append(case("batch of 2", dict(SCALED), shape=BATCH_SHAPE, steps=12))
    if sd15:
        out.append(case("sd15 20 steps", SD15, steps=20))
        out.append(case("sd15 50 steps", SD15, steps=50))
    return out


def algorithm_cases(algorithms):
    """DPM-Solver algorithm_type cases; the non-"++" algorithms require final_sigmas_type=sigma_min."""
    out = []
    for algo in algorithms:
        base = {"algorithm_type": algo}
        if "++" not in algo:
            base["final_sigmas_type"] = "sigma_min"
        out += [
            case(f"algorithm_type={algo}", base),
            case(f"algorithm_type={algo} order 1", dict(base, solver_order=1)),
            case(f"algorithm_type={algo} heun", dict(base, solver_type="heun")),
            case(f"algorithm_type={algo} v_prediction karras",
                 dict(base, prediction_type="v_prediction", use_karras_sigmas=True)),
        ]
        # diffusers has no third-order sde-dpmsolver update (it fails with UnboundLocalError)
        if algo != "sde-dpmsolver":
            out.append(case(f"algorithm_type={algo} order 3", dict(base, solver_order=3)))
    return out


def cases_for(cls):
    if cls == "DDIMScheduler":
        return common(zero_snr=True) + [
            case("eta=0", eta=0.0),
            case("eta=1 (noise)", eta=1.0),
            case("eta=0.5 batch of 2 sd15", SD15, shape=BATCH_SHAPE, eta=0.5, steps=15),
            case("clip_sample=false", {"clip_sample": False}),
            case("clip_sample_range=2", {"clip_sample_range": 2.0}),
            case("set_alpha_to_one=false", {"set_alpha_to_one": False}),
            case("thresholding", {"thresholding": True, "sample_max_value": 1.5}),
            case("thresholding batch of 2 v_prediction",
                 {"thresholding": True, "prediction_type": "v_prediction", "dynamic_thresholding_ratio": 0.9},
                 shape=BATCH_SHAPE),
        ]
    if cls == "DDPMScheduler":
        out = common(schedules=("scaled_linear", "squaredcos_cap_v2", "sigmoid"), zero_snr=True)
        # fixed_large_log is left out: diffusers 0.42.1's DDPMScheduler.step takes the square root of
        # log(beta_t) < 0 for it, so every trajectory with a noise draw is NaN (nothing to compare).
        for v in ("fixed_small", "fixed_small_log", "fixed_large", "learned", "learned_range"):
            out.append(case(f"variance_type={v}", {"variance_type": v}))
        out.append(case("variance_type=learned_range batch of 2 scaled_linear",
                        dict(SCALED, variance_type="learned_range"), shape=BATCH_SHAPE))
        out += [
            case("clip_sample=false", {"clip_sample": False}),
            case("thresholding", {"thresholding": True, "sample_max_value": 1.5}),
            case("thresholding batch of 2", {"thresholding": True}, shape=BATCH_SHAPE),
            case("custom timesteps", timesteps=[999, 850, 700, 500, 301, 150, 50, 10, 0]),
            case("custom timesteps v_prediction", {"prediction_type": "v_prediction"},
                 timesteps=[900, 600, 300, 100, 1]),
            case("1000 steps", steps=1000, shape=[1, 1, 1, 1]),
        ]
        return out
    if cls == "PNDMScheduler":
        out = [case("default (full saved config)", full_config=True)]
        for skip in (False, True):
            base = {"skip_prk_steps": skip}
            tag = f"skip_prk_steps={'true' if skip else 'false'}"
            out += [
                case(f"{tag}", base),
                case(f"{tag} v_prediction", dict(base, prediction_type="v_prediction")),
                case(f"{tag} trailing", dict(base, timestep_spacing="trailing")),
                case(f"{tag} linspace", dict(base, timestep_spacing="linspace")),
                case(f"{tag} steps_offset=1", dict(base, steps_offset=1)),
                case(f"{tag} set_alpha_to_one", dict(base, set_alpha_to_one=True)),
                case(f"{tag} scaled_linear", dict(base, **SCALED)),
                case(f"{tag} squaredcos_cap_v2", dict(base, beta_schedule="squaredcos_cap_v2")),
                case(f"{tag} 25 steps", base, steps=25),
                case(f"{tag} batch of 2", base, shape=BATCH_SHAPE, steps=7),
            ]
        out.append(case("sd15 20 steps", SD15, steps=20))
        out.append(case("sd15 50 steps", SD15, steps=50))
        out.append(case("sd15 with PRK 20 steps", dict(SD15, skip_prk_steps=False), steps=20))
        return out
    if cls in ("LCMScheduler", "TCDScheduler"):
        out = [
            case("default 4 steps (full saved config)", steps=4, full_config=True),
            case("8 steps", steps=8),
            case("prediction_type=v_prediction", {"prediction_type": "v_prediction"}, steps=4),
            case("prediction_type=sample", {"prediction_type": "sample"}, steps=4),
            case("beta_schedule=linear", {"beta_schedule": "linear", "beta_start": 0.0001, "beta_end": 0.02}, steps=4),
            case("beta_schedule=squaredcos_cap_v2", {"beta_schedule": "squaredcos_cap_v2"}, steps=4),
            case("clip_sample", {"clip_sample": True}, steps=4),
            case("thresholding", {"thresholding": True, "sample_max_value": 1.5}, steps=4),
            case("set_alpha_to_one=false", {"set_alpha_to_one": False}, steps=4),
            case("original_inference_steps=100 timestep_scaling=5",
                 {"original_inference_steps": 100, "timestep_scaling": 5.0}, steps=6),
            case("rescale_betas_zero_snr v_prediction",
                 {"rescale_betas_zero_snr": True, "prediction_type": "v_prediction"}, steps=4),
            case("custom timesteps", timesteps=[999, 759, 499, 259]),
            case("batch of 2", shape=BATCH_SHAPE, steps=5),
            case("sd15 config 6 steps", SD15, steps=6),
        ]
        if cls == "TCDScheduler":
            out += [
                case("eta=0", eta=0.0, steps=4),
                case("eta=0.3", eta=0.3, steps=4),
                case("eta=1", eta=1.0, steps=6),
                case("eta=0.3 custom timesteps", eta=0.3, timesteps=[999, 845, 699, 499, 259, 59]),
                case("eta=0.5 batch of 2", eta=0.5, shape=BATCH_SHAPE, steps=5),
            ]
        return out
    if cls == "LMSDiscreteScheduler":
        return common(sigma_opts=True)
    if cls == "EulerDiscreteScheduler":
        return common(sigma_opts=True, final_sigma=True, zero_snr=True) + [
            case("interpolation_type=log_linear", {"interpolation_type": "log_linear"}),
            case("timestep_type=continuous v_prediction",
                 {"timestep_type": "continuous", "prediction_type": "v_prediction"}),
            case("karras sigma_min=0.1 sigma_max=10",
                 {"use_karras_sigmas": True, "sigma_min": 0.1, "sigma_max": 10.0}),
            case("custom timesteps", timesteps=[999, 850, 700.5, 500, 300, 100, 10]),
            case("custom sigmas", sigmas=[14.6, 8.0, 4.0, 2.0, 1.0, 0.5, 0.1, 0.0]),
        ]
    if cls == "EulerAncestralDiscreteScheduler":
        # diffusers raises NotImplementedError for prediction_type=sample here
        return common(preds=("v_prediction",), zero_snr=True)
    if cls == "HeunDiscreteScheduler":
        return common(sigma_opts=True) + [
            case("clip_sample", {"clip_sample": True, "prediction_type": "sample"}),
            case("clip_sample_range=0.5 epsilon", {"clip_sample": True, "clip_sample_range": 0.5}),
            case("custom timesteps", timesteps=[999, 850, 700.5, 500, 300, 100, 10]),
        ]
    if cls == "KDPM2DiscreteScheduler":
        # diffusers raises NotImplementedError for prediction_type=sample here
        return common(preds=("v_prediction",), sigma_opts=True)
    if cls == "KDPM2AncestralDiscreteScheduler":
        # diffusers raises NotImplementedError for prediction_type=sample here; with
        # squaredcos_cap_v2 its first interpolated sigma is NaN (sigma_down = 0 at sigma_max ~ 2e4),
        # so that schedule has no finite trajectory to compare.
        return common(preds=("v_prediction",), schedules=("scaled_linear",), sigma_opts=True)
    if cls == "DPMSolverMultistepScheduler":
        out = common(sigma_opts=True, final_sigma=True, zero_snr=True)
        out += [
            case("solver_order=1", {"solver_order": 1}),
            case("solver_order=3", {"solver_order": 3}),
            case("solver_order=3 11 steps", {"solver_order": 3}, steps=11),
            case("solver_type=heun", {"solver_type": "heun"}),
            case("solver_order=3 heun", {"solver_order": 3, "solver_type": "heun"}),
            case("lower_order_final=false", {"lower_order_final": False}),
            case("lower_order_final=false order 3", {"lower_order_final": False, "solver_order": 3}),
            case("euler_at_final", {"euler_at_final": True}),
            case("use_lu_lambdas", {"use_lu_lambdas": True}),
            case("lambda_min_clipped=-5.1 squaredcos_cap_v2",
                 {"lambda_min_clipped": -5.1, "beta_schedule": "squaredcos_cap_v2"}),
            case("thresholding", {"thresholding": True, "sample_max_value": 1.5}),
            case("thresholding batch of 2 sample", {"thresholding": True, "prediction_type": "sample"},
                 shape=BATCH_SHAPE),
            case("custom timesteps", timesteps=[999, 850, 700, 500, 300, 100, 10]),
            case("variance_type=learned_range (3 channels)", {"variance_type": "learned_range"},
                 shape=[1, 3, 2, 2]),
            case("dpm++2m karras sd15 25 steps", dict(SD15, use_karras_sigmas=True), steps=25),
        ]
        out += algorithm_cases(("dpmsolver", "sde-dpmsolver++", "sde-dpmsolver"))
        out.append(case("sde-dpmsolver++ batch of 2", {"algorithm_type": "sde-dpmsolver++"}, shape=BATCH_SHAPE))
        return out
    if cls == "DPMSolverSinglestepScheduler":
        # no timestep_spacing / steps_offset / rescale_betas_zero_snr in this class
        out = common(spacings=(), offset=False, sigma_opts=True, final_sigma=True)
        out += [
            case("solver_order=1", {"solver_order": 1}),
            case("solver_order=3", {"solver_order": 3}),
            case("solver_order=3 11 steps", {"solver_order": 3}, steps=11),
            case("solver_order=3 12 steps", {"solver_order": 3}, steps=12),
            case("solver_order=2 7 steps", {"solver_order": 2}, steps=7),
            case("solver_type=heun", {"solver_type": "heun"}),
            case("solver_order=3 heun", {"solver_order": 3, "solver_type": "heun"}),
            case("lower_order_final=true", {"lower_order_final": True}),
            case("lower_order_final=true order 3 11 steps", {"lower_order_final": True, "solver_order": 3}, steps=11),
            case("lambda_min_clipped=-5.1 squaredcos_cap_v2",
                 {"lambda_min_clipped": -5.1, "beta_schedule": "squaredcos_cap_v2"}),
            case("thresholding", {"thresholding": True, "sample_max_value": 1.5}),
            case("custom timesteps", timesteps=[999, 850, 700, 500, 300, 100, 10]),
            case("variance_type=learned_range (3 channels)", {"variance_type": "learned_range"},
                 shape=[1, 3, 2, 2]),
        ]
        out += algorithm_cases(("dpmsolver", "sde-dpmsolver++"))
        return out
    if cls == "UniPCMultistepScheduler":
        out = common(sigma_opts=True, final_sigma=True, zero_snr=True)
        # bh1 ends in NaN in diffusers whenever the final sigma is zero (its last update multiplies
        # B(h) = -inf by the predictor residual), so the bh1 cases end on sigma_min; the NaN
        # trajectories themselves are not recorded.
        bh1 = {"solver_type": "bh1", "final_sigmas_type": "sigma_min"}
        for order in (1, 2, 3):
            out.append(case(f"bh1 order {order} sigma_min", dict(bh1, solver_order=order)))
            out.append(case(f"bh2 order {order}", {"solver_type": "bh2", "solver_order": order}))
        out += [
            case("bh1 karras 20 steps sigma_min", dict(bh1, use_karras_sigmas=True), steps=20),
            # predict_x0=false (the noise-prediction UniPC) also ends in NaN on a zero final sigma
            case("predict_x0=false sigma_min", {"predict_x0": False, "final_sigmas_type": "sigma_min"}),
            case("predict_x0=false bh1 order 3 sigma_min", dict(bh1, predict_x0=False, solver_order=3)),
            case("disable_corrector=[0]", {"disable_corrector": [0]}),
            case("disable_corrector=[0,1,4] order 3", {"disable_corrector": [0, 1, 4], "solver_order": 3}),
            # on a zero final sigma a third-order last step makes diffusers solve a singular system
            case("lower_order_final=false order 3 sigma_min",
                 {"lower_order_final": False, "solver_order": 3, "final_sigmas_type": "sigma_min"}),
            case("thresholding", {"thresholding": True, "sample_max_value": 1.5}),
            case("karras sd15 25 steps", dict(SD15, use_karras_sigmas=True), steps=25),
        ]
        return out
    if cls == "DEISMultistepScheduler":
        out = common(sigma_opts=True)
        out += [
            case("solver_order=1", {"solver_order": 1}),
            case("solver_order=3", {"solver_order": 3}),
            case("solver_order=3 11 steps", {"solver_order": 3}, steps=11),
            case("lower_order_final=false order 3", {"lower_order_final": False, "solver_order": 3}),
            case("thresholding", {"thresholding": True, "sample_max_value": 1.5}),
        ]
        return out
    raise KeyError(cls)


# ---------------------------------------------------------------------------------------------
# Patching: noise recording and float32 promotion


class _Promoted:
    """A module proxy whose `float32` is `float64` (everything else passes through)."""

    def __init__(self, module):
        self._module = module

    def __getattr__(self, name):
        if name == "float32":
            return self._module.float64
        return getattr(self._module, name)


class NoiseRecorder:
    """Stands in for diffusers' randn_tensor: seeded float64 draws, or replay of a recording."""

    def __init__(self, seed=None, replay=None):
        self.rng = np.random.default_rng(seed) if replay is None else None
        self.replay = list(replay) if replay is not None else None
        self.draws = []

    def __call__(self, shape, generator=None, device=None, dtype=None, layout=None):
        shape = tuple(int(s) for s in shape)
        if self.replay is not None:
            if not self.replay:
                raise RuntimeError("replayed noise ran out")
            values = torch.tensor(self.replay.pop(0), dtype=torch.float64).reshape(shape)
        else:
            values = torch.from_numpy(self.rng.standard_normal(shape))
        values = values.to(dtype or torch.get_default_dtype())
        self.draws.append(values.to(torch.float64).flatten().tolist())
        return values


@contextlib.contextmanager
def patched(module, recorder, promoted):
    saved = {name: getattr(module, name) for name in ("randn_tensor", "torch", "np") if hasattr(module, name)}
    saved_dtype = torch.get_default_dtype()
    try:
        if "randn_tensor" in saved:
            module.randn_tensor = recorder
        if promoted:
            module.torch = _Promoted(torch)
            module.np = _Promoted(np)
            torch.set_default_dtype(torch.float64)
        yield
    finally:
        for name, value in saved.items():
            setattr(module, name, value)
        torch.set_default_dtype(saved_dtype)


# ---------------------------------------------------------------------------------------------
# The toy loop


def toy(x_in, t, learned):
    out = 0.8 * x_in * math.cos(t / 1000.0) + 0.1 * torch.sin(x_in)
    if learned:
        out = torch.cat([out, 0.25 * (1.0 + torch.tanh(x_in))], dim=1)
    return out


def flat(t):
    return t.detach().to(torch.float64).flatten().tolist()


def run(cls_name, module, c, recorder, promoted):
    cls = getattr(diffusers, cls_name)
    with patched(module, recorder, promoted):
        sched = cls.from_config(c["config"])
        if "timesteps" in c:
            sched.set_timesteps(timesteps=c["timesteps"])
        elif "sigmas" in c:
            sched.set_timesteps(sigmas=c["sigmas"])
        else:
            sched.set_timesteps(c["num_inference_steps"])
        timesteps = sched.timesteps.clone()
        sigmas = getattr(sched, "sigmas", None)
        sigmas = flat(sigmas) if isinstance(sigmas, torch.Tensor) else None
        init = float(sched.init_noise_sigma)
        learned = c["config"].get("variance_type") in ("learned", "learned_range")
        x = torch.tensor(c["sample"], dtype=torch.float64).reshape(c["shape"]) * sched.init_noise_sigma
        kwargs = {} if c.get("eta") is None else {"eta": c["eta"]}
        samples = []
        for t in timesteps:
            x_in = sched.scale_model_input(x, t)
            out = toy(x_in, float(t), learned)
            x = sched.step(out, t, x, **kwargs).prev_sample
            if x.dtype != torch.float64:
                raise RuntimeError(f"{cls_name}: step returned {x.dtype}")
            samples.append(flat(x))
        config = json.loads(sched.to_json_string())
    return {
        "config": config,
        "timesteps": flat(timesteps),
        "timesteps_dtype": str(timesteps.dtype).replace("torch.", ""),
        "sigmas": sigmas,
        "init_noise_sigma": init,
        "samples": samples,
        "final": samples[-1],
        "noise_draws": len(recorder.draws),
    }


def rel_diff(a, b):
    """max|a - b| / max(1, max|b|), the parity tests' measure; inf when the sizes differ."""
    a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    if a.shape != b.shape:
        return math.inf
    if a.size == 0:
        return 0.0
    return float(np.max(np.abs(a - b)) / max(1.0, float(np.max(np.abs(b)))))


def seed_of(*parts):
    return zlib.crc32("/".join(parts).encode())


def build_case(cls_name, module, c):
    seed = seed_of(cls_name, c["name"])
    rng = np.random.default_rng(seed)
    c = dict(c)
    c["sample"] = rng.standard_normal(int(np.prod(c["shape"]))).tolist()

    recorder = NoiseRecorder(seed=seed + 1)
    ref = run(cls_name, module, c, recorder, promoted=False)
    twin = run(cls_name, module, c, NoiseRecorder(replay=recorder.draws), promoted=True)

    for s in ref["samples"]:
        if not all(math.isfinite(v) for v in s):
            raise RuntimeError(f"{cls_name} / {c['name']}: non-finite sample")

    # The twin can hit a float64-only degenerate case (e.g. DPM-Solver's sde-dpmsolver takes
    # sqrt(exp(2h) - 1) with h = -1e-16 where float32 gives exactly 0, and turns NaN); its
    # float32 measure then covers the steps before the first non-finite value.
    finite = [all(math.isfinite(v) for v in b) for b in twin["samples"]]
    usable = finite.index(False) if False in finite else len(finite)
    f32 = {
        "timesteps": rel_diff(ref["timesteps"], twin["timesteps"]),
        "sigmas": rel_diff(ref["sigmas"], twin["sigmas"]) if ref["sigmas"] is not None else 0.0,
        "init_noise_sigma": rel_diff([ref["init_noise_sigma"]], [twin["init_noise_sigma"]]),
        "samples": max([rel_diff(a, b) for a, b in zip(ref["samples"][:usable], twin["samples"][:usable])],
                       default=0.0),
    }
    if len(ref["samples"]) != len(twin["samples"]) or not all(math.isfinite(v) for v in f32.values()):
        raise RuntimeError(f"{cls_name} / {c['name']}: the float64 twin diverged structurally: {f32}")
    if usable < len(finite):
        f32["twin_finite_steps"] = usable
        twin["final"] = None
        print(f"  note: {cls_name} / {c['name']}: float64 twin non-finite from step {usable}", file=sys.stderr)

    if c.get("full_config"):
        config = ref["config"]
    else:
        config = dict(c["config"])
        config.setdefault("_class_name", cls_name)
        config.setdefault("_diffusers_version", diffusers.__version__)
    out = {
        "name": c["name"],
        "class": cls_name,
        "config": config,
        "num_inference_steps": c.get("num_inference_steps"),
        "timesteps": c.get("timesteps"),
        "sigmas": c.get("sigmas"),
        "shape": c["shape"],
        "sample": c["sample"],
        "eta": c.get("eta"),
        "noise": recorder.draws,
        "expected": {k: ref[k] for k in ("timesteps", "timesteps_dtype", "sigmas", "init_noise_sigma",
                                         "samples", "final", "noise_draws")},
        "f32_noise": f32,
        "expected_f64": {k: twin[k] for k in ("timesteps", "sigmas", "init_noise_sigma", "final")},
    }
    return out


def header(cls_name):
    return {
        "generator": "scripts/scheduler_reference.py",
        "diffusers_version": diffusers.__version__,
        "torch_version": torch.__version__.split("+")[0],
        "numpy_version": np.__version__,
        "class": cls_name,
    }


def write_json(path, obj):
    with open(path, "w") as f:
        json.dump(obj, f, allow_nan=True, separators=(",", ":"))
        f.write("\n")


def schedules_fixture():
    """Betas / alphas_cumprod of every beta schedule (via DDPMScheduler) plus add_noise / get_velocity.

    diffusers keeps betas and alphas_cumprod in float32; they are written in shortest float32 form
    (see shortest_f32), so a reader recovers diffusers' exact values by rounding to float32.
    add_noise / get_velocity of a float64 batch are float64 (diffusers casts alphas_cumprod to the
    sample dtype), with the float64 twin's values beside them."""
    module = importlib.import_module("diffusers.schedulers.scheduling_ddpm")
    configs = [
        ("linear", {"beta_schedule": "linear"}),
        ("scaled_linear", dict(SCALED)),
        ("squaredcos_cap_v2", {"beta_schedule": "squaredcos_cap_v2"}),
        ("sigmoid", {"beta_schedule": "sigmoid"}),
        ("scaled_linear rescale_betas_zero_snr", dict(SCALED, rescale_betas_zero_snr=True)),
        ("linear 100 train steps", {"beta_schedule": "linear", "num_train_timesteps": 100,
                                    "beta_start": 0.001, "beta_end": 0.05}),
    ]
    rng = np.random.default_rng(seed_of("schedules"))
    shape = [3, 2, 2, 2]
    x0 = torch.from_numpy(rng.standard_normal(shape))
    noise = torch.from_numpy(rng.standard_normal(shape))
    out = []
    for name, cfg in configs:
        tables = {}
        for promoted in (False, True):
            with patched(module, None, promoted):
                s = diffusers.DDPMScheduler.from_config(cfg)
                n = s.config.num_train_timesteps
                ts = torch.tensor([0, n // 2 - 1, n - 1], dtype=torch.int64)
                tables[promoted] = {
                    "betas": flat(s.betas),
                    "alphas_cumprod": flat(s.alphas_cumprod),
                    "add_noise": flat(s.add_noise(x0, noise, ts)),
                    "get_velocity": flat(s.get_velocity(x0, noise, ts)),
                    "config": json.loads(s.to_json_string()),
                    "timesteps": ts.tolist(),
                }
        ref, twin = tables[False], tables[True]
        out.append({
            "name": name,
            "config": ref["config"],
            "shape": shape,
            "original_samples": flat(x0),
            "noise": flat(noise),
            "timesteps": ref["timesteps"],
            "expected": {
                "betas": shortest_f32(ref["betas"]),
                "alphas_cumprod": shortest_f32(ref["alphas_cumprod"]),
                "add_noise": ref["add_noise"],
                "get_velocity": ref["get_velocity"],
            },
            "expected_f64": {k: twin[k] for k in ("add_noise", "get_velocity")},
        })
    return out


def shortest_f32(values):
    """float32 values written as their shortest float32 decimal (rounding the decimal to float32
    gives the value back exactly), which is about half as long as the float64 repr."""
    out = []
    for v in values:
        f = np.float32(v)
        short = float(str(f))
        if np.float32(short) != f:
            raise RuntimeError(f"shortest float32 form of {v!r} does not round-trip")
        out.append(short)
    return out


def main():
    if diffusers.__version__ != EXPECTED_DIFFUSERS:
        print(f"warning: diffusers {diffusers.__version__}, fixtures are meant for {EXPECTED_DIFFUSERS}",
              file=sys.stderr)
    torch.use_deterministic_algorithms(True)
    torch.set_num_threads(1)
    import diffusers.utils.logging as dlog
    dlog.set_verbosity_error()
    os.makedirs(OUT_DIR, exist_ok=True)
    only = set(sys.argv[1:])
    total = 0
    for cls_name, module_name, file_name in CLASSES:
        if only and cls_name not in only and file_name not in only:
            continue
        module = importlib.import_module(f"diffusers.schedulers.{module_name}")
        cases = []
        names = set()
        for c in cases_for(cls_name):
            if c["name"] in names:
                raise RuntimeError(f"{cls_name}: duplicate case name {c['name']!r}")
            names.add(c["name"])
            cases.append(build_case(cls_name, module, c))
        path = os.path.join(OUT_DIR, file_name)
        write_json(path, dict(header(cls_name), cases=cases))
        size = os.path.getsize(path)
        total += size
        worst = max(c["f32_noise"]["samples"] for c in cases)
        print(f"{file_name:32} {len(cases):3} cases {size / 1024:8.1f} KiB  max f32 noise {worst:.2e}")
    if not only or "schedules.json" in only:
        path = os.path.join(OUT_DIR, "schedules.json")
        write_json(path, dict(header("DDPMScheduler"), cases=schedules_fixture()))
        total += os.path.getsize(path)
        print(f"{'schedules.json':32} {os.path.getsize(path) / 1024:8.1f} KiB")
    print(f"total {total / 1024:.1f} KiB")


if __name__ == "__main__":
    main()
