//! `--device`: a bad spec is a usage error; `--device cuda` on a build without the `cuda`
//! feature, or on a machine without a driver, exits with an error naming what is missing. With
//! a usable GPU (feature `cuda` and a device), GPU expert nodes give the single-process logits
//! of the f32, bf16 and FP8 tiny models (f32 wire; within 1e-4 on f32, 2e-2 on bf16/FP8, which
//! run bf16 GEMMs); without one that part prints that it was skipped.

pub mod harness;

use harness::*;

fn stderr(out: &std::process::Output) -> String {
    String::from_utf8_lossy(&out.stderr).into_owned()
}

#[test]
fn a_bad_device_is_a_usage_error() {
    let model = fixture("tiny-dsv3");
    for cmd in ["expert-node", "serve", "router", "up"] {
        let out = moe(&[
            cmd,
            "--model",
            model.to_str().expect("utf8"),
            "--device",
            "tpu",
        ]);
        let err = stderr(&out);
        assert_eq!(out.status.code(), Some(2), "{cmd}: {err}");
        assert!(
            err.contains("invalid value 'tpu' for '--device"),
            "{cmd}: {err}"
        );
        assert!(err.contains("expected cpu, cuda or cuda:N"), "{cmd}: {err}");
    }
}

/// Whether this build and machine can run CUDA experts.
fn gpu_here() -> bool {
    #[cfg(feature = "cuda")]
    {
        moe_model::cuda::available()
    }
    #[cfg(not(feature = "cuda"))]
    {
        false
    }
}

#[test]
fn cuda_without_a_gpu_is_a_clear_error() {
    if gpu_here() {
        eprintln!("skipped: a CUDA device is present (the GPU tests below cover it)");
        return;
    }
    let model = fixture("tiny-dsv3");
    let m = model.to_str().expect("utf8");
    let expected = if cfg!(feature = "cuda") {
        "CUDA is not available"
    } else {
        "this build has no CUDA support; rebuild with --features cuda"
    };
    for args in [
        vec![
            "expert-node",
            "--model",
            m,
            "--experts",
            "*:*",
            "--device",
            "cuda",
        ],
        vec![
            "expert-node",
            "--model",
            m,
            "--experts",
            "*:*",
            "--device",
            "cuda:1",
        ],
        vec![
            "serve",
            "--model",
            m,
            "--listen",
            "127.0.0.1:0",
            "--device",
            "cuda",
        ],
        vec![
            "up",
            "--model",
            m,
            "--listen",
            "127.0.0.1:0",
            "--device",
            "cuda",
        ],
    ] {
        let out = moe(&args);
        let err = stderr(&out);
        assert!(!out.status.success(), "{args:?} started without a GPU");
        assert!(err.contains(expected), "{args:?}: {err}");
        assert!(!err.contains("panicked"), "{args:?} panicked: {err}");
    }
}

/// GPU expert nodes against the single-process engine (f32 wire), on each tiny model.
#[test]
fn gpu_expert_nodes_match_the_cpu() {
    if !gpu_here() {
        eprintln!("skipped: no usable CUDA device in this build/machine");
        return;
    }
    for (name, tol) in [
        ("tiny-dsv3", 1e-4),
        ("tiny-dsv3-bf16", 2e-2),
        ("tiny-dsv3-fp8", 2e-2),
    ] {
        let model = fixture(name);
        let prompts: Vec<Vec<u64>> = golden(name)["prompts"]
            .as_array()
            .expect("prompts")
            .iter()
            .map(|p| ids(&p["ids"]))
            .collect();
        let node = expert_node(&model, &["--experts", "*:*", "--device", "cuda"]);
        let dir = tempfile::tempdir().expect("tmp");
        let local = moe_logits(&model, &prompts, dir.path(), &[]);
        let remote = moe_logits(
            &model,
            &prompts,
            dir.path(),
            &["--experts-at", &node.addr, "--wire", "f32"],
        );
        let mut d = 0.0f32;
        for (k, a) in &local {
            let b = &remote[k];
            for (x, y) in a.iter().zip(b) {
                d = d.max((x - y).abs());
            }
        }
        eprintln!("{name}: GPU experts, max |logit diff| vs single process = {d:e}");
        assert!(
            d <= tol,
            "{name}: GPU expert logits differ by {d} (tolerance {tol})"
        );
    }
}
