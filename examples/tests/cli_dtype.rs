//! `diffusion generate --dtype`: on the CPU (ndarray, which has no f16 / bf16 tensors) a
//! reduced precision is a one-line typed error before any model is read, never a panic.

use std::process::Command;

#[test]
fn half_precision_on_ndarray_is_a_clear_error() {
    for dtype in ["f16", "bf16"] {
        let out = Command::new(env!("CARGO_BIN_EXE_diffusion"))
            .args([
                "generate",
                "--model",
                "/nonexistent/model",
                "--prompt",
                "x",
                "--device",
                "cpu",
                "--dtype",
                dtype,
            ])
            .output()
            .expect("run diffusion");
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success(), "{dtype}: succeeded");
        assert_eq!(out.status.code(), Some(1), "{dtype}: {stderr}");
        assert!(!stderr.contains("panicked"), "{dtype}: {stderr}");
        let name = if dtype == "f16" {
            "float16"
        } else {
            "bfloat16"
        };
        assert!(
            stderr.starts_with("error: ")
                && stderr.contains(&format!("--dtype {dtype} on --device cpu"))
                && stderr.contains(name)
                && stderr.contains("ndarray"),
            "{dtype}: {stderr}"
        );
        // The dtype is checked before the (missing) model folder is opened.
        assert!(!stderr.contains("nonexistent"), "{dtype}: {stderr}");
    }
}
