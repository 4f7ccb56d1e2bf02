//! End-to-end tests of the `nvp` binary on tiny configs and fixtures the
//! tests write themselves: train → checkpoint → resume → eval → sample →
//! interpolate, exact resume, clear errors on bad input.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

fn nvp(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_nvp"))
        .args(args)
        .output()
        .expect("run nvp")
}

fn ok(args: &[&str]) -> String {
    let o = nvp(args);
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(o.status.success(), "nvp {args:?} failed: {err}");
    String::from_utf8_lossy(&o.stdout).into_owned()
}

/// Runs `args`, expects a clean failure (exit 1, one `error:` line, no
/// panic) and returns stderr.
fn fails(args: &[&str]) -> String {
    let o = nvp(args);
    let err = String::from_utf8_lossy(&o.stderr).into_owned();
    assert!(!o.status.success(), "nvp {args:?} should fail");
    assert!(!err.contains("panicked"), "nvp {args:?} panicked: {err}");
    assert!(err.contains("error"), "{err}");
    err
}

fn tmp(name: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!("nvp-cli-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).unwrap();
    d
}

const TINY: &str = r#"
name = "tiny"
[data]
dataset = "procedural"
train-size = 48
test-size = 12
[model]
height = 8
width = 8
scales = 2
res-blocks = 1
features = 4
[train]
batch-size = 8
max-steps = 4
eval-every = 2
samples = 4
seed = 3
"#;

fn write(dir: &Path, name: &str, text: &str) -> PathBuf {
    let p = dir.join(name);
    std::fs::write(&p, text).unwrap();
    p
}

fn png_size(p: &Path) -> (u32, u32) {
    let img = image::open(p).unwrap_or_else(|e| panic!("{} does not decode: {e}", p.display()));
    (img.width(), img.height())
}

/// The number after `"key":` in a one-line JSON object printed by `nvp`.
fn json_number(out: &str, key: &str) -> f64 {
    let rest = out
        .split(&format!("\"{key}\":"))
        .nth(1)
        .unwrap_or_else(|| panic!("no `{key}` in {out}"));
    let end = rest.find([',', '}']).unwrap_or(rest.len());
    rest[..end]
        .trim()
        .parse()
        .unwrap_or_else(|e| panic!("`{key}` in {out}: {e}"))
}

fn s(p: &Path) -> &str {
    p.to_str().unwrap()
}

/// `nvp train --config cfg --out out --max-steps steps`, which must succeed.
fn train_for(cfg: &Path, out: &Path, steps: &str) -> String {
    ok(&[
        "train",
        "--config",
        s(cfg),
        "--out",
        s(out),
        "--max-steps",
        steps,
    ])
}

#[test]
fn train_resume_eval_sample_interpolate() {
    let d = tmp("e2e");
    let cfg = write(&d, "tiny.toml", TINY);
    let full = d.join("full");
    let split = d.join("split");
    ok(&["train", "--config", s(&cfg), "--out", s(&full)]);
    for f in [
        "model.safetensors",
        "optimizer.safetensors",
        "state.toml",
        "config.toml",
    ] {
        assert!(full.join("last").join(f).is_file(), "missing last/{f}");
        assert!(full.join("best").join(f).is_file(), "missing best/{f}");
    }
    // the weights get the mode of the checkpoint's other files (the umask's), not the
    // safetensors writer's private 0600
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        let mode = |f: &str| {
            std::fs::metadata(full.join("last").join(f))
                .unwrap()
                .permissions()
                .mode()
        };
        assert_eq!(mode("model.safetensors"), mode("state.toml"));
        assert_eq!(mode("optimizer.safetensors"), mode("state.toml"));
    }
    let csv = std::fs::read_to_string(full.join("metrics.csv")).unwrap();
    assert_eq!(
        csv.lines().count(),
        3,
        "header + rows at steps 2 and 4: {csv}"
    );
    assert!(full.join("bpd.png").is_file() && full.join("samples/step-0000004.png").is_file());

    // Stop after the checkpoint at step 2, then resume to step 4: the same
    // parameters and optimizer state, bit for bit, as the uninterrupted run.
    train_for(&cfg, &split, "2");
    // as if the save had been cut off between its two renames: only `last.old` is
    // whole; the run resumes from it, and it stays until the new `last` replaces it
    std::fs::rename(split.join("last"), split.join("last.old")).unwrap();
    let err = fails(&["train", "--config", s(&cfg), "--out", s(&split)]);
    assert!(err.contains("--resume"), "{err}");
    ok(&["train", "--out", s(&split), "--resume", "--max-steps", "4"]);
    assert!(split.join("last").is_dir() && !split.join("last.old").exists());
    for f in ["model.safetensors", "optimizer.safetensors"] {
        let a = std::fs::read(full.join("last").join(f)).unwrap();
        let b = std::fs::read(split.join("last").join(f)).unwrap();
        assert!(a == b, "{f} differs after resume");
    }
    let state = std::fs::read_to_string(split.join("last/state.toml")).unwrap();
    assert!(state.contains("step = 4"), "{state}");

    // eval: JSON with a finite bits/dim and its standard error
    let out = ok(&["eval", "--ckpt", s(&full), "--json", "--check-inverse"]);
    assert!(out.contains("\"images\":12"), "{out}");
    let inv = json_number(&out, "inverse_max_abs_error");
    assert!(inv < 1e-4, "inverse error {inv}: {out}");
    let bpd = json_number(&out, "bpd");
    assert!(bpd.is_finite() && bpd > 0.0 && bpd < 16.0, "{out}");
    let text = ok(&[
        "eval",
        "--ckpt",
        s(&full.join("last/model.safetensors")),
        "--limit",
        "5",
    ]);
    assert!(text.contains("5 images") && text.contains('±'), "{text}");

    // sample: a grid PNG and one PNG per sample of the model's size
    let grid = d.join("grid.png");
    let each = d.join("each");
    ok(&[
        "sample",
        "--ckpt",
        s(&full),
        "--n",
        "4",
        "--temperature",
        "0.7",
        "--out",
        s(&grid),
        "--each",
        s(&each),
    ]);
    let (gw, gh) = png_size(&grid);
    assert!(gw >= 16 && gh >= 16);
    assert_eq!(png_size(&each.join("sample-00003.png")), (8, 8));

    // interpolate: from dataset indices and from image files
    let ip = d.join("manifold.png");
    ok(&[
        "interpolate",
        "--ckpt",
        s(&full),
        "--indices",
        "0,1,2,3",
        "--steps",
        "3",
        "--out",
        s(&ip),
    ]);
    let (w, h) = png_size(&ip);
    assert_eq!(w, h, "a square steps × steps grid");
    let imgs: Vec<String> = (0..4)
        .map(|i| s(&each.join(format!("sample-{i:05}.png"))).to_string())
        .collect();
    let ip2 = d.join("manifold2.png");
    let mut args = vec![
        "interpolate",
        "--ckpt",
        s(&full),
        "--steps",
        "3",
        "--out",
        s(&ip2),
        "--images",
    ];
    args.extend(imgs.iter().map(String::as_str));
    ok(&args);
    assert_eq!(png_size(&ip2), (w, h));
    // two images: one row of the grid, the path from the first to the second
    let ip3 = d.join("path.png");
    ok(&[
        "interpolate",
        "--ckpt",
        s(&full),
        "--indices",
        "0,1",
        "--steps",
        "3",
        "--out",
        s(&ip3),
    ]);
    let (pw, ph) = png_size(&ip3);
    assert_eq!(pw, w, "as wide as the 3 × 3 grid");
    assert!(3 * ph < h + 6, "one row of cells: {ph} vs the grid's {h}");
    let err = fails(&[
        "interpolate",
        "--ckpt",
        s(&full),
        "--indices",
        "0,1,2",
        "--out",
        s(&ip3),
    ]);
    assert!(
        err.contains("four images") && err.contains("got 3"),
        "{err}"
    );

    // sample at twice the size (App. C): the same weights, 16×16 images
    let big = d.join("big");
    ok(&[
        "sample",
        "--ckpt",
        s(&full),
        "--n",
        "2",
        "--size",
        "16x16",
        "--out",
        s(&d.join("big.png")),
        "--each",
        s(&big),
    ]);
    assert_eq!(png_size(&big.join("sample-00001.png")), (16, 16));
    let err = fails(&[
        "sample",
        "--ckpt",
        s(&full),
        "--size",
        "9x8",
        "--out",
        s(&grid),
    ]);
    assert!(
        err.contains("--size 9x8") && err.contains("divisible by 2"),
        "{err}"
    );
    let err = fails(&[
        "sample",
        "--ckpt",
        s(&full),
        "--size",
        "big",
        "--out",
        s(&grid),
    ]);
    assert!(err.contains("HxW"), "{err}");
    let err = fails(&[
        "sample",
        "--ckpt",
        s(&full),
        "--size",
        "65536x8",
        "--out",
        s(&grid),
    ]);
    assert!(err.contains("between 1 and 4096"), "{err}");
    let err = fails(&[
        "sample",
        "--ckpt",
        s(&full),
        "--class",
        "1",
        "--out",
        s(&grid),
    ]);
    assert!(err.contains("not class-conditional"), "{err}");
    let err = fails(&["eval", "--ckpt", s(&full), "--classify"]);
    assert!(
        err.contains("--classify") && err.contains("class-conditional"),
        "{err}"
    );

    // compress (App. D): per image the original, then 100 % and 50 % of the latents
    // kept (two scales); keeping all of them gives the original back, pixel for pixel
    let cp = d.join("compress.png");
    let o = nvp(&[
        "compress",
        "--ckpt",
        s(&full),
        "--indices",
        "0,1",
        "--out",
        s(&cp),
    ]);
    let msg = String::from_utf8_lossy(&o.stderr);
    assert!(o.status.success(), "{msg}");
    assert!(msg.contains("100 / 50 %"), "{msg}");
    let img = image::open(&cp).unwrap().to_rgb8();
    let z = (img.width() as usize - 2) / 3 - 2; // zoom × 8
    assert_eq!(img.width() as usize, 3 * (z + 2) + 2, "three columns");
    assert_eq!(img.height() as usize, 2 * (z + 2) + 2, "two rows");
    let cell = |r: usize, c: usize| -> Vec<u8> {
        let (x0, y0) = (2 + c * (z + 2), 2 + r * (z + 2));
        (0..z)
            .flat_map(|y| (0..z).map(move |x| (x0 + x, y0 + y)))
            .flat_map(|(x, y)| img.get_pixel(x as u32, y as u32).0)
            .collect()
    };
    for r in 0..2 {
        assert!(
            cell(r, 0) == cell(r, 1),
            "row {r}: 100 % kept is the original"
        );
        assert!(cell(r, 0) != cell(r, 2), "row {r}: 50 % kept differs");
    }
    let cp1 = d.join("compress1.png");
    ok(&[
        "compress",
        "--ckpt",
        s(&full),
        "--out",
        s(&cp1),
        "--temperature",
        "0.5",
        "--images",
        &imgs[0],
    ]);
    assert_eq!(png_size(&cp1).0, img.width(), "one row of the same width");
    let err = fails(&["compress", "--ckpt", s(&full), "--out", s(&cp1)]);
    assert!(err.contains("--images"), "{err}");
    let err = fails(&[
        "relabel",
        "--ckpt",
        s(&full),
        "--indices",
        "0",
        "--out",
        s(&cp1),
    ]);
    assert!(err.contains("class-conditional"), "{err}");
    std::fs::remove_dir_all(&d).ok();
}

/// App. F: `classes = 4` under `[model]` trains a class-conditional model on the
/// procedural images' labels; eval, its inverse check, sample (classes in turn or one
/// class) and compress work with the labels; interpolate and a missing class are
/// clear errors.
#[test]
fn class_conditional_model_trains_evaluates_samples_and_compresses() {
    let d = tmp("cond");
    let cfg = write(
        &d,
        "cond.toml",
        // (trained long enough, at a higher rate, for the labels to move pixels)
        &TINY
            .replace("features = 4\n", "features = 4\nclasses = 4\n")
            .replace("max-steps = 4\n", "max-steps = 60\nlr = 0.01\n"),
    );
    let run = d.join("run");
    ok(&["train", "--config", s(&cfg), "--out", s(&run)]);
    let saved = std::fs::read_to_string(run.join("last/config.toml")).unwrap();
    assert!(saved.contains("classes = 4"), "{saved}");
    let out = ok(&["eval", "--ckpt", s(&run), "--json", "--check-inverse"]);
    let bpd = json_number(&out, "bpd");
    assert!(bpd.is_finite() && bpd > 0.0, "{out}");
    assert!(json_number(&out, "inverse_max_abs_error") < 1e-4, "{out}");
    // --classify: p(x) = Σ_y p(x|y)/4 ≥ p(x|label)/4, so its bits/dim are at most the
    // conditional ones plus log2(4)/D (D = 3·8·8); accuracy is a fraction
    let out = ok(&["eval", "--ckpt", s(&run), "--json", "--classify"]);
    let (cond, marg) = (json_number(&out, "bpd"), json_number(&out, "marginal_bpd"));
    assert!(
        marg.is_finite() && marg <= cond + 2.0 / 192.0 + 1e-9,
        "{out}"
    );
    // each image under its own label: the plain evaluation's value (same noise)
    assert!((cond - bpd).abs() < 1e-9, "{cond} vs {bpd}");
    let acc = json_number(&out, "accuracy");
    assert!((0.0..=1.0).contains(&acc), "{out}");
    let each = d.join("each");
    ok(&[
        "sample",
        "--ckpt",
        s(&run),
        "--n",
        "8",
        "--out",
        s(&d.join("all.png")),
    ]);
    let (w, h) = png_size(&d.join("all.png"));
    assert_eq!(
        (w - 2) / (h - 2),
        2,
        "8 samples in 4 columns (one per class), 2 rows"
    );
    ok(&[
        "sample",
        "--ckpt",
        s(&run),
        "--n",
        "2",
        "--class",
        "2",
        "--out",
        s(&d.join("two.png")),
        "--each",
        s(&each),
    ]);
    let err = fails(&[
        "sample",
        "--ckpt",
        s(&run),
        "--class",
        "4",
        "--out",
        s(&d.join("x.png")),
    ]);
    assert!(
        err.contains("label 4") && err.contains("4 classes"),
        "{err}"
    );
    ok(&[
        "compress",
        "--ckpt",
        s(&run),
        "--indices",
        "0,1",
        "--out",
        s(&d.join("c.png")),
    ]);
    let img = s(&each.join("sample-00000.png")).to_string();
    let c1 = d.join("c1.png");
    let err = fails(&[
        "compress",
        "--ckpt",
        s(&run),
        "--out",
        s(&c1),
        "--images",
        &img,
    ]);
    assert!(err.contains("--class"), "{err}");
    ok(&[
        "compress",
        "--ckpt",
        s(&run),
        "--class",
        "2",
        "--out",
        s(&c1),
        "--images",
        &img,
    ]);
    // relabel (App. F): per image the original, then its latents decoded with each
    // class; its own class gives it back pixel for pixel, the others differ
    let rl = d.join("relabel.png");
    let o = nvp(&[
        "relabel",
        "--ckpt",
        s(&run),
        "--indices",
        "0,1,2",
        "--out",
        s(&rl),
    ]);
    let msg = String::from_utf8_lossy(&o.stderr);
    assert!(o.status.success(), "{msg}");
    let own: Vec<usize> = msg
        .split("(classes ")
        .nth(1)
        .and_then(|t| t.split(')').next())
        .expect("the message names the images' classes")
        .split(", ")
        .map(|c| c.parse().unwrap())
        .collect();
    assert_eq!(own.len(), 3, "{msg}");
    let rimg = image::open(&rl).unwrap().to_rgb8();
    let z = (rimg.width() as usize - 2) / 5 - 2; // zoom × 8
    assert_eq!(
        rimg.width() as usize,
        5 * (z + 2) + 2,
        "original + 4 classes"
    );
    assert_eq!(rimg.height() as usize, 3 * (z + 2) + 2, "three rows");
    let cell = |r: usize, c: usize| -> Vec<u8> {
        let (x0, y0) = (2 + c * (z + 2), 2 + r * (z + 2));
        (0..z)
            .flat_map(|y| (0..z).map(move |x| (x0 + x, y0 + y)))
            .flat_map(|(x, y)| rimg.get_pixel(x as u32, y as u32).0)
            .collect()
    };
    // (after a few steps the labels move few pixels: some other class must differ)
    let mut others_differ = 0;
    for (r, &y) in own.iter().enumerate() {
        assert!(cell(r, 0) == cell(r, 1 + y), "row {r}: own class {y}");
        others_differ += (0..4)
            .filter(|&k| k != y && cell(r, 0) != cell(r, 1 + k))
            .count();
    }
    assert!(others_differ > 0, "no other class changes any pixel");
    ok(&[
        "relabel",
        "--ckpt",
        s(&run),
        "--images",
        &img,
        "--class",
        "1",
        "--to",
        "3,0",
        "--out",
        s(&d.join("relabel1.png")),
    ]);
    let err = fails(&[
        "relabel",
        "--ckpt",
        s(&run),
        "--indices",
        "0",
        "--to",
        "4",
        "--out",
        s(&rl),
    ]);
    assert!(err.contains("--to") && err.contains("4 classes"), "{err}");
    let err = fails(&[
        "relabel",
        "--ckpt",
        s(&run),
        "--images",
        &img,
        "--out",
        s(&rl),
    ]);
    assert!(err.contains("--class"), "{err}");
    let ip = d.join("i.png");
    let err = fails(&[
        "interpolate",
        "--ckpt",
        s(&run),
        "--indices",
        "0,1",
        "--out",
        s(&ip),
    ]);
    assert!(err.contains("class-conditional"), "{err}");
    // labels the model cannot take are refused before training, naming the keys
    let bad = write(
        &d,
        "bad.toml",
        &TINY.replace("features = 4\n", "features = 4\nclasses = 2\n"),
    );
    let err = fails(&["train", "--config", s(&bad), "--out", s(&d.join("bad"))]);
    assert!(
        err.contains("model.classes = 2") && err.contains("data.classes"),
        "{err}"
    );
    std::fs::remove_dir_all(&d).ok();
}

#[test]
fn misspelt_config_key_names_the_key() {
    let d = tmp("typo");
    let cfg = write(
        &d,
        "bad.toml",
        &TINY.replace("batch-size = 8", "bacth-size = 8"),
    );
    let err = fails(&["train", "--config", s(&cfg), "--out", s(&d.join("run"))]);
    assert!(
        err.contains("bacth-size") && err.contains("batch-size"),
        "{err}"
    );
    assert!(err.contains("bad.toml"), "names the file: {err}");
    let cfg = write(
        &d,
        "bad2.toml",
        &TINY.replace("features = 4", "featurs = 4"),
    );
    let err = fails(&["train", "--config", s(&cfg), "--out", s(&d.join("run"))]);
    assert!(err.contains("featurs") && err.contains("features"), "{err}");
    let cfg = write(&d, "bad3.toml", &TINY.replace("scales = 2", "scales = 4"));
    let err = fails(&["train", "--config", s(&cfg), "--out", s(&d.join("run"))]);
    assert!(err.contains("model.scales"), "{err}");
    std::fs::remove_dir_all(&d).ok();
}

#[test]
fn non_finite_steps_stop_the_run_and_spare_the_checkpoint() {
    let d = tmp("nan");
    let cfg = TINY
        .replace("lr = 1e-3\n", "")
        .replace(
            "[train]\n",
            "[train]\nlr = 1e30\nclip = 0.0\nmax-bad-steps = 3\n",
        )
        .replace("max-steps = 4", "max-steps = 40")
        .replace("eval-every = 2", "eval-every = 1");
    let cfg = write(&d, "nan.toml", &cfg);
    let run = d.join("run");
    let err = fails(&["train", "--config", s(&cfg), "--out", s(&run)]);
    assert!(err.contains("non-finite steps in a row"), "{err}");
    // whatever was checkpointed is complete, finite and usable
    let out = ok(&["eval", "--ckpt", s(&run), "--json"]);
    assert!(out.contains("\"bpd\":"), "{out}");
    let st = std::fs::read_to_string(run.join("last/state.toml")).unwrap();
    assert!(
        st.contains("skipped-steps = 0"),
        "checkpoints are written only after good steps: {st}"
    );
    // diverging before the first checkpoint: the message says there is none
    let cfg = write(
        &d,
        "nan-early.toml",
        &std::fs::read_to_string(&cfg)
            .unwrap()
            .replace("eval-every = 1", "eval-every = 1000"),
    );
    let early = d.join("early");
    let err = fails(&["train", "--config", s(&cfg), "--out", s(&early)]);
    assert!(
        err.contains("no checkpoint was saved") && !err.contains("intact"),
        "{err}"
    );
    std::fs::remove_dir_all(&d).ok();
}

#[test]
fn bad_checkpoints_and_flags_give_clear_errors() {
    let d = tmp("errs");
    let cfg = write(&d, "tiny.toml", TINY);
    let run = d.join("run");
    train_for(&cfg, &run, "2");

    let err = fails(&["eval", "--ckpt", s(&d.join("nope"))]);
    assert!(err.contains("does not exist"), "{err}");
    let err = fails(&["sample", "--ckpt", s(&d), "--out", s(&d.join("x.png"))]);
    assert!(err.contains("holds no checkpoint"), "{err}");
    let err = fails(&["eval", "--ckpt", s(&run), "--split", "validation"]);
    assert!(err.contains("--split"), "{err}");
    let err = fails(&[
        "train",
        "--config",
        s(&cfg),
        "--out",
        s(&d.join("r2")),
        "--device",
        "gpu",
    ]);
    assert!(err.contains("unknown device `gpu`"), "{err}");
    #[cfg(not(feature = "cuda"))]
    {
        let err = fails(&["eval", "--ckpt", s(&run), "--device", "cuda"]);
        assert!(err.contains("built without CUDA support"), "{err}");
    }
    let err = fails(&[
        "sample",
        "--ckpt",
        s(&run),
        "--out",
        s(&d.join("x.png")),
        "--temperature=-1",
    ]);
    assert!(err.contains("--temperature"), "{err}");

    // a checkpoint that does not fit its config names the tensor and both shapes
    let c = run.join("last/config.toml");
    let text = std::fs::read_to_string(&c).unwrap();
    std::fs::write(&c, text.replace("features = 4", "features = 6")).unwrap();
    let err = fails(&["eval", "--ckpt", s(&run)]);
    assert!(
        err.contains("tensor `scale") && err.contains("shape"),
        "{err}"
    );
    std::fs::write(&c, text).unwrap();

    // a non-finite weight is refused when loading, naming the file and the tensor: the
    // first 4 bytes of the data (after the 8-byte header length and the JSON header)
    // become an f32 NaN
    let model = run.join("last/model.safetensors");
    let good = std::fs::read(&model).unwrap();
    let mut bad = good.clone();
    let start = 8 + u64::from_le_bytes(good[..8].try_into().unwrap()) as usize;
    bad[start..start + 4].copy_from_slice(&f32::NAN.to_le_bytes());
    std::fs::write(&model, &bad).unwrap();
    let err = fails(&["eval", "--ckpt", s(&run)]);
    assert!(
        err.contains("model.safetensors") && err.contains("non-finite") && err.contains("tensor `"),
        "{err}"
    );
    std::fs::write(&model, &good).unwrap();

    // --data with the procedural dataset (e.g. a forgotten --config) is refused
    let err = fails(&["train", "--data", s(&d), "--out", s(&d.join("r3"))]);
    assert!(
        err.contains("procedural") && err.contains("--config"),
        "{err}"
    );

    // sizes that cannot be held in memory, and a name that is a path
    let err = fails(&[
        "sample",
        "--ckpt",
        s(&run),
        "--n",
        "1000000000",
        "--out",
        s(&d.join("x.png")),
    ]);
    assert!(err.contains("--n") && err.contains("GiB"), "{err}");
    let err = fails(&[
        "interpolate",
        "--ckpt",
        s(&run),
        "--indices",
        "0,1",
        "--steps",
        "100000",
        "--out",
        s(&d.join("x.png")),
    ]);
    assert!(err.contains("--steps"), "{err}");
    let evil = write(
        &d,
        "evil.toml",
        &TINY.replace("name = \"tiny\"", "name = \"../evil\""),
    );
    let err = fails(&["train", "--config", s(&evil), "--max-steps", "1"]);
    assert!(err.contains("name") && err.contains("../evil"), "{err}");

    // a killed save's temporary folder is removed by the next save
    let stale = run.join(".last.tmp-4000000");
    std::fs::create_dir_all(&stale).unwrap();
    std::fs::write(stale.join("model.safetensors"), b"partial").unwrap();
    ok(&["train", "--out", s(&run), "--resume", "--max-steps", "4"]);
    assert!(!stale.exists(), "the stale temporary folder is still there");

    // an image of the wrong size for interpolate
    let small = d.join("small.png");
    image::RgbImage::new(5, 5).save(&small).unwrap();
    let p = s(&small);
    let err = fails(&[
        "interpolate",
        "--ckpt",
        s(&run),
        "--images",
        p,
        p,
        p,
        p,
        "--out",
        s(&d.join("i.png")),
    ]);
    assert!(err.contains("5×5") && err.contains("small.png"), "{err}");
    std::fs::remove_dir_all(&d).ok();
}

#[test]
fn trains_on_cifar_format_files() {
    let d = tmp("cifar");
    let data = d.join("cifar-10-batches-bin");
    std::fs::create_dir_all(&data).unwrap();
    let mut state = 12345u64;
    let mut rec = |n: usize| -> Vec<u8> {
        let mut v = Vec::with_capacity(n * 3073);
        for i in 0..n {
            v.push((i % 10) as u8);
            for _ in 0..3072 {
                state = state
                    .wrapping_mul(6364136223846793005)
                    .wrapping_add(1442695040888963407);
                v.push((state >> 56) as u8);
            }
        }
        v
    };
    std::fs::write(data.join("data_batch_1.bin"), rec(16)).unwrap();
    std::fs::write(data.join("test_batch.bin"), rec(6)).unwrap();
    let cfg = write(
        &d,
        "c.toml",
        "name = \"c\"\n[data]\ndataset = \"cifar10\"\n[model]\nres-blocks = 1\nfeatures = 2\n[train]\nbatch-size = 4\nmax-steps = 2\neval-every = 2\nsamples = 1\n",
    );
    let run = d.join("run");
    let err = fails(&["train", "--config", s(&cfg), "--out", s(&run)]);
    assert!(err.contains("data.path"), "{err}");
    // --data relative to the working directory of `train`; `eval` runs elsewhere and
    // finds the data through the run's saved config
    let o = Command::new(env!("CARGO_BIN_EXE_nvp"))
        .current_dir(&d)
        .args(["train", "--config", s(&cfg), "--out", s(&run)])
        .args(["--data", "cifar-10-batches-bin"])
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let out = ok(&["eval", "--ckpt", s(&run), "--json"]);
    assert!(out.contains("\"images\":6"), "{out}");
    // noise images cost about 8 bits/dim, and never fewer than 0
    let bpd = json_number(&out, "bpd");
    assert!(bpd > 5.0 && bpd < 12.0, "{out}");
    // a truncated batch file is an error naming the file
    let bytes = std::fs::read(data.join("test_batch.bin")).unwrap();
    std::fs::write(data.join("test_batch.bin"), &bytes[..bytes.len() - 100]).unwrap();
    let err = fails(&["eval", "--ckpt", s(&run), "--data", s(&data)]);
    assert!(err.contains("test_batch.bin"), "{err}");
    std::fs::remove_dir_all(&d).ok();
}

#[test]
fn killed_run_resumes_to_the_same_parameters() {
    let d = tmp("kill");
    // With the learned batch-norm affine: its parameters and their Adam moments must
    // be saved and restored too. No evaluation in the run: its checkpoints are the
    // timed ones (`checkpoint-minutes`, here after every step).
    let cfg = write(
        &d,
        "tiny.toml",
        &TINY
            .replace(
                "eval-every = 2",
                "eval-every = 1000000\ncheckpoint-minutes = 1e-9\nema = 0.9",
            )
            .replace("features = 4", "features = 4\nbn-affine = true"),
    );
    let killed = d.join("killed");
    let mut child = spawn_train(&cfg, &killed, std::process::Stdio::null());
    // wait for a checkpoint beyond step 2, then kill -9 (possibly mid-save)
    let t0 = std::time::Instant::now();
    loop {
        let st = std::fs::read_to_string(killed.join("last/state.toml")).unwrap_or_default();
        if st
            .lines()
            .any(|l| l.starts_with("step = ") && l[7..].trim().parse::<u64>().unwrap_or(0) >= 3)
        {
            break;
        }
        assert!(t0.elapsed().as_secs() < 120, "no checkpoint appeared");
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
    child.kill().unwrap();
    child.wait().unwrap();
    // the checkpoint on disk is complete: resume it a few steps further
    let step = saved_step(&killed.join("last"));
    let straight = d.join("straight");
    assert_resume_matches_straight_run(
        &cfg,
        &killed,
        &straight,
        step + 3,
        &[
            "model.safetensors",
            "optimizer.safetensors",
            "ema.safetensors",
        ],
    );
    let model = std::fs::read(straight.join("last/model.safetensors")).unwrap();
    assert!(
        model.windows(9).any(|w| w == b"log_scale"),
        "the checkpoint has no batch-norm affine"
    );
    std::fs::remove_dir_all(&d).ok();
}

/// `train.ema`: the averaged model is saved beside the trained one, scored by the
/// periodic evaluation, and loaded by `eval` unless `--ckpt` names `model.safetensors`.
#[test]
fn averaged_parameters_are_saved_evaluated_and_chosen() {
    let d = tmp("ema");
    let cfg = write(
        &d,
        "tiny.toml",
        &TINY.replace("eval-every = 2", "eval-every = 4\nema = 0.9"),
    );
    let run = d.join("run");
    ok(&["train", "--config", s(&cfg), "--out", s(&run)]);
    let last = run.join("last");
    let ema = std::fs::read(last.join("ema.safetensors")).unwrap();
    let live = std::fs::read(last.join("model.safetensors")).unwrap();
    assert!(ema != live, "the average equals the trained parameters");
    let avg = ok(&["eval", "--ckpt", s(&run), "--json"]);
    assert!(avg.contains("\"weights\":\"ema.safetensors\""), "{avg}");
    let trained = ok(&[
        "eval",
        "--ckpt",
        s(&last.join("model.safetensors")),
        "--json",
    ]);
    assert!(
        trained.contains("\"weights\":\"model.safetensors\""),
        "{trained}"
    );
    let (a, t) = (json_number(&avg, "bpd"), json_number(&trained, "bpd"));
    assert!(a != t, "the same bits/dim from both: {a}");
    // the metrics row of step 4 is the averaged model's test bits/dim
    let csv = std::fs::read_to_string(run.join("metrics.csv")).unwrap();
    let row = csv.lines().last().unwrap();
    let test_bpd: f64 = row.split(',').nth(4).unwrap().parse().unwrap();
    assert!((test_bpd - a).abs() < 1e-5, "{row} vs {a}"); // the CSV has 5 decimals
    std::fs::remove_dir_all(&d).ok();
}

/// `nvp train --config cfg --out out --max-steps <many>` in the background.
fn spawn_train(cfg: &Path, out: &Path, stderr: std::process::Stdio) -> std::process::Child {
    Command::new(env!("CARGO_BIN_EXE_nvp"))
        .args([
            "train",
            "--config",
            s(cfg),
            "--out",
            s(out),
            "--max-steps",
            "1000000",
        ])
        .stdout(std::process::Stdio::null())
        .stderr(stderr)
        .spawn()
        .unwrap()
}

/// Resumes the run in `run` to step `target`, trains `cfg` straight to `target` in
/// `straight`, and asserts that `files` of their `last/` checkpoints are the same bytes.
fn assert_resume_matches_straight_run(
    cfg: &Path,
    run: &Path,
    straight: &Path,
    target: u64,
    files: &[&str],
) {
    let target = target.to_string();
    ok(&["train", "--out", s(run), "--resume", "--max-steps", &target]);
    ok(&[
        "train",
        "--config",
        s(cfg),
        "--out",
        s(straight),
        "--max-steps",
        &target,
    ]);
    for f in files {
        let a = std::fs::read(run.join("last").join(f)).unwrap();
        let b = std::fs::read(straight.join("last").join(f)).unwrap();
        assert!(
            a == b,
            "{f} differs between the resumed run {} and the straight run",
            run.display()
        );
    }
}

/// The step number in a checkpoint's `state.toml`.
fn saved_step(ckpt: &Path) -> u64 {
    let st = std::fs::read_to_string(ckpt.join("state.toml")).unwrap();
    st.lines()
        .find_map(|l| l.strip_prefix("step = "))
        .unwrap()
        .trim()
        .parse()
        .unwrap()
}

/// SIGINT (Ctrl-C) and SIGTERM stop `nvp train` after the current step with its
/// checkpoint saved and exit status 130; resuming it ends where a straight run does.
#[cfg(unix)]
#[test]
fn interrupted_run_saves_its_step_and_resumes_exactly() {
    use std::io::{BufRead, BufReader};
    let d = tmp("sigint");
    // No evaluation and no timed checkpoint: the checkpoint is the interrupt's. With a
    // learning-rate warm-up longer than the run: the resumed steps must take it up
    // where it was.
    let cfg = write(
        &d,
        "tiny.toml",
        &TINY.replace(
            "eval-every = 2",
            "eval-every = 1000000\ncheckpoint-minutes = 0\nlr-warmup = 100000",
        ),
    );
    for signal in ["-INT", "-TERM"] {
        let run = d.join(&signal[1..]);
        let mut child = spawn_train(&cfg, &run, std::process::Stdio::piped());
        let mut stderr = BufReader::new(child.stderr.take().unwrap());
        let mut header = String::new();
        stderr.read_line(&mut header).unwrap();
        assert!(header.starts_with("nvp train:"), "{header}");
        // a tiny step takes milliseconds: by now it has taken some
        std::thread::sleep(std::time::Duration::from_millis(1500));
        assert!(
            !run.join("last").exists(),
            "a checkpoint before the interrupt"
        );
        let killed = Command::new("kill")
            .args([signal, &child.id().to_string()])
            .status()
            .unwrap();
        assert!(killed.success());
        let mut rest = String::new();
        std::io::Read::read_to_string(&mut stderr, &mut rest).unwrap();
        let status = child.wait().unwrap();
        assert_eq!(status.code(), Some(130), "{signal}: {rest}");
        assert!(!rest.contains("panicked"), "{rest}");
        let step = saved_step(&run.join("last"));
        assert!(step >= 1, "{rest}");
        assert!(
            rest.contains(&format!(
                "error: interrupted at step {step}; checkpoint saved in"
            )) && rest.contains("--resume"),
            "{rest}"
        );
        assert_resume_matches_straight_run(
            &cfg,
            &run,
            &d.join(format!("straight{signal}")),
            step + 2,
            &["model.safetensors", "optimizer.safetensors"],
        );
    }
    // The warm-up is applied: without it, the same steps give other parameters.
    let no_warmup = d.join("no-warmup");
    let cfg0 = write(
        &d,
        "tiny0.toml",
        &TINY.replace("eval-every = 2", "eval-every = 1000000"),
    );
    train_for(&cfg0, &no_warmup, "2");
    let warm = d.join("warm");
    train_for(&cfg, &warm, "2");
    let a = std::fs::read(warm.join("last/model.safetensors")).unwrap();
    let b = std::fs::read(no_warmup.join("last/model.safetensors")).unwrap();
    assert!(a != b, "lr-warmup changed nothing");
    std::fs::remove_dir_all(&d).ok();
}

/// `nvp bench --json` on the embedded demo model: one JSON line with the throughputs,
/// the paths that ran (on the CPU: this crate's kernels and their compilation, or
/// candle's with `NVP_FAST_CPU=0`) and the phase split of a training step.
#[test]
fn bench_reports_throughput_paths_and_phases() {
    let args = [
        "bench",
        "--json",
        "--batch",
        "2",
        "--warmup",
        "0",
        "--steps",
        "1",
        "--eval-batch",
        "2",
        "--eval-reps",
        "1",
        "--sample-n",
        "2",
        "--sample-reps",
        "1",
    ];
    let out = ok(&args);
    let line = out
        .lines()
        .rfind(|l| l.starts_with('{'))
        .expect("a JSON line");
    for key in ["train_img_per_s", "eval_img_per_s", "sample_img_per_s"] {
        assert!(json_number(line, key) > 0.0, "{key} in {line}");
    }
    for key in ["train_forward_s", "train_backward_s", "train_update_s"] {
        let v = json_number(line, key);
        assert!(v.is_finite() && v > 0.0, "{key} = {v} in {line}");
    }
    assert!(line.contains("\"device\":\"cpu\""), "{line}");
    // The CPU kernels' compilation that ran is named.
    assert!(
        ["avx512", "avx2", "portable"]
            .iter()
            .any(|k| line.contains(&format!("\"conv\":\"nvp-winograd-{k}\""))),
        "{line}"
    );
    assert!(line.contains("\"batch_norm\":\"nvp\""), "{line}");
    let o = Command::new(env!("CARGO_BIN_EXE_nvp"))
        .args(args)
        .env("NVP_FAST_CPU", "0")
        .output()
        .expect("run nvp");
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let out = String::from_utf8_lossy(&o.stdout);
    assert!(out.contains("\"conv\":\"candle\""), "{out}");
    assert!(out.contains("\"batch_norm\":\"candle\""), "{out}");
    // No phase split asked for: the fields are JSON nulls, not NaN.
    let mut no_phases = args.to_vec();
    no_phases.extend(["--phase-steps", "0"]);
    let out = ok(&no_phases);
    assert!(out.contains("\"train_forward_s\":null"), "{out}");
    assert!(!out.contains("NaN"), "{out}");
    // Neither evaluation nor sampling asked for: likewise nulls.
    let mut no_eval = no_phases.clone();
    for flag in ["--eval-reps", "--sample-reps"] {
        let i = no_eval.iter().position(|a| *a == flag).expect(flag);
        no_eval[i + 1] = "0";
    }
    let out = ok(&no_eval);
    assert!(out.contains("\"eval_img_per_s\":null"), "{out}");
    assert!(out.contains("\"sample_img_per_s\":null"), "{out}");
    assert!(!out.contains("NaN"), "{out}");
    // Steps below one are refused, not divided by.
    let err = fails(&["bench", "--steps", "0"]);
    assert!(err.contains("--steps"), "{err}");
}

/// `data.stream = true`: an image folder decoded by the loader's workers trains to the
/// same parameters as the same folder read into memory, and evaluates, interpolates and
/// reports bad files the same way; `stream` is refused for other datasets.
#[test]
fn streamed_image_folder_trains_like_the_in_memory_one() {
    let d = tmp("stream");
    let data = d.join("images");
    for k in 0..40u32 {
        let img = image::RgbImage::from_fn(8, 8, |x, y| {
            image::Rgb([
                (x * 30 + k) as u8,
                (y * 30) as u8,
                ((x + y) * 7 + 3 * k) as u8,
            ])
        });
        let sub = data.join(if k % 2 == 0 { "a" } else { "b" });
        std::fs::create_dir_all(&sub).unwrap();
        img.save(sub.join(format!("{k:03}.png"))).unwrap();
    }
    let folder = |stream: bool| {
        TINY.replace(
            "dataset = \"procedural\"\ntrain-size = 48\ntest-size = 12",
            &format!("dataset = \"folder\"\nholdout = 0.25\nstream = {stream}"),
        )
    };
    let mem_cfg = write(&d, "mem.toml", &folder(false));
    let st_cfg = write(&d, "st.toml", &folder(true));
    let (mem, st) = (d.join("mem"), d.join("st"));
    for (cfg, run) in [(&mem_cfg, &mem), (&st_cfg, &st)] {
        ok(&[
            "train",
            "--config",
            s(cfg),
            "--data",
            s(&data),
            "--out",
            s(run),
        ]);
    }
    let a = std::fs::read(mem.join("last/model.safetensors")).unwrap();
    let b = std::fs::read(st.join("last/model.safetensors")).unwrap();
    assert!(a == b, "streamed and in-memory training differ");
    // A resume on a moved copy of the data says so.
    let moved = d.join("moved");
    for sub in ["a", "b"] {
        std::fs::create_dir_all(moved.join(sub)).unwrap();
        for e in std::fs::read_dir(data.join(sub)).unwrap() {
            let e = e.unwrap();
            std::fs::copy(e.path(), moved.join(sub).join(e.file_name())).unwrap();
        }
    }
    let mem2 = d.join("mem2");
    copy_dir(&mem, &mem2);
    let o = nvp(&[
        "train",
        "--out",
        s(&mem2),
        "--resume",
        "--data",
        s(&moved),
        "--max-steps",
        "5",
    ]);
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(o.status.success(), "{err}");
    assert!(
        err.contains("note: the run was started on the data in") && err.contains("moved"),
        "{err}"
    );
    let saved = std::fs::read_to_string(st.join("config.toml")).unwrap();
    assert!(saved.contains("stream = true"), "{saved}");
    let e_mem = ok(&["eval", "--ckpt", s(&mem), "--json"]);
    let e_st = ok(&["eval", "--ckpt", s(&st), "--json", "--limit", "4"]);
    assert!(e_mem.contains("\"images\":10"), "{e_mem}");
    assert!(e_st.contains("\"images\":4"), "{e_st}");
    let out = d.join("walk.png");
    ok(&[
        "interpolate",
        "--ckpt",
        s(&st),
        "--data",
        s(&data),
        "--indices",
        "0,1,2,3",
        "--steps",
        "3",
        "--out",
        s(&out),
    ]);
    let err = fails(&[
        "interpolate",
        "--ckpt",
        s(&st),
        "--data",
        s(&data),
        "--indices",
        "0,1,2,99",
        "--out",
        s(&out),
    ]);
    assert!(err.contains("99") && err.contains("out of range"), "{err}");
    // more class sub-folders (a, b) than model.classes: refused before training
    for stream in [false, true] {
        let cfg = write(
            &d,
            "cls.toml",
            &folder(stream)
                .replace("holdout = 0.25", "holdout = 0.25\nclass-subfolders = true")
                .replace("features = 4", "features = 4\nclasses = 1"),
        );
        let run = d.join(format!("cls-{stream}"));
        let err = fails(&[
            "train",
            "--config",
            s(&cfg),
            "--data",
            s(&data),
            "--out",
            s(&run),
        ]);
        assert!(
            err.contains("2 class sub-folders") && err.contains("model.classes = 2"),
            "{err}"
        );
        assert!(!run.join("last").exists());
    }
    // a broken file stops a streamed run with its name, or is skipped with a warning
    std::fs::write(data.join("a/000.png"), b"broken").unwrap();
    let err = fails(&[
        "train",
        "--config",
        s(&st_cfg),
        "--data",
        s(&data),
        "--out",
        s(&d.join("bad")),
        "--max-steps",
        "40",
    ]);
    assert!(err.contains("000.png"), "{err}");
    let skip_cfg = write(
        &d,
        "skip.toml",
        &folder(true).replace("stream = true", "stream = true\nskip-bad-images = true"),
    );
    let o = nvp(&[
        "train",
        "--config",
        s(&skip_cfg),
        "--data",
        s(&data),
        "--out",
        s(&d.join("skip")),
        "--max-steps",
        "8",
    ]);
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(o.status.success(), "{err}");
    assert!(
        err.contains("unreadable") && err.contains("000.png"),
        "{err}"
    );
    // stream is for image folders only; a missing folder is named once, not twice
    let cifar = write(
        &d,
        "c.toml",
        "[data]\ndataset = \"cifar10\"\nstream = true\n",
    );
    let out = d.join("refused");
    let err = fails(&[
        "train",
        "--config",
        s(&cifar),
        "--data",
        s(&data),
        "--out",
        s(&out),
    ]);
    assert!(err.contains("data.stream"), "{err}");
    let err = fails(&[
        "train",
        "--config",
        s(&st_cfg),
        "--data",
        s(&d.join("none")),
        "--out",
        s(&out),
    ]);
    assert_eq!(err.matches("No such file").count(), 1, "{err}");
    std::fs::remove_dir_all(&d).ok();
}

/// `--resume --config FILE`: accepted when FILE is the run's config (also with
/// `--max-steps`, which a resume may change), refused with every differing key named
/// when it is not.
#[test]
fn resume_takes_its_own_config_and_names_what_differs() {
    let dir = tmp("resume-config");
    let cfg = write(&dir, "tiny.toml", TINY);
    let run = dir.join("run");
    train_for(&cfg, &run, "2");
    ok(&[
        "train",
        "--config",
        s(&cfg),
        "--out",
        s(&run),
        "--resume",
        "--max-steps",
        "4",
    ]);
    let state = std::fs::read_to_string(run.join("last").join("state.toml")).unwrap();
    assert!(state.contains("step = 4"), "{state}");
    let changed = write(
        &dir,
        "changed.toml",
        &TINY
            .replace("seed = 3", "seed = 4")
            .replace("features = 4", "features = 6"),
    );
    let err = fails(&[
        "train",
        "--config",
        s(&changed),
        "--out",
        s(&run),
        "--resume",
    ]);
    assert!(
        err.contains("train.seed (the run's 3, the file's 4)")
            && err.contains("model.features (the run's 4, the file's 6)")
            && err.contains("drop --config"),
        "{err}"
    );
    // The run is untouched by the refused resume.
    let after = std::fs::read_to_string(run.join("last").join("state.toml")).unwrap();
    assert_eq!(state, after);
}

/// Copies a folder tree (files and folders only).
fn copy_dir(from: &Path, to: &Path) {
    std::fs::create_dir_all(to).unwrap();
    for e in std::fs::read_dir(from).unwrap() {
        let e = e.unwrap();
        if e.file_type().unwrap().is_dir() {
            copy_dir(&e.path(), &to.join(e.file_name()));
        } else {
            std::fs::copy(e.path(), to.join(e.file_name())).unwrap();
        }
    }
}

/// `precision = "bf16"` under `[train]` (or `--precision bf16`): where the CPU has
/// AVX512-BF16, a run trains with it, saves it in its config, resumes with it, and
/// `bench` reports it; elsewhere a clear error. Bad values name the choices.
#[test]
fn bf16_precision_trains_or_says_why_not() {
    let d = tmp("bf16");
    let cfg = write(&d, "c.toml", TINY);
    let err = fails(&[
        "train",
        "--config",
        s(&cfg),
        "--out",
        s(&d.join("x")),
        "--precision",
        "fp16",
    ]);
    assert!(err.contains("`f32` or `bf16`"), "{err}");
    let bad = write(
        &d,
        "bad.toml",
        &TINY.replace("seed = 3", "seed = 3\nprecision = \"fp16\""),
    );
    let err = fails(&["train", "--config", s(&bad), "--out", s(&d.join("y"))]);
    assert!(
        err.contains("bad.toml") && err.contains("fp16") && err.contains("bf16"),
        "{err}"
    );
    let run = d.join("run");
    let args = [
        "train",
        "--config",
        s(&cfg),
        "--out",
        s(&run),
        "--max-steps",
        "2",
        "--precision",
        "bf16",
    ];
    if nvp_kernels::bf16_products_available() {
        ok(&args);
        let saved = std::fs::read_to_string(run.join("config.toml")).unwrap();
        assert!(saved.contains("precision = \"bf16\""), "{saved}");
        ok(&["train", "--out", s(&run), "--resume", "--max-steps", "4"]);
        let state = std::fs::read_to_string(run.join("last/state.toml")).unwrap();
        assert!(state.contains("step = 4"), "{state}");
        let out = ok(&[
            "bench",
            "--config",
            s(&cfg),
            "--json",
            "--batch",
            "2",
            "--warmup",
            "0",
            "--steps",
            "1",
            "--eval-reps",
            "0",
            "--sample-reps",
            "0",
            "--phase-steps",
            "0",
            "--precision",
            "bf16",
        ]);
        assert!(out.contains("\"precision\":\"bf16\""), "{out}");
        // Without the Winograd kernels there are no bf16 products to run.
        let mut again = args;
        let fresh = d.join("run2");
        again[4] = s(&fresh);
        let o = Command::new(env!("CARGO_BIN_EXE_nvp"))
            .args(again)
            .env("NVP_WINOGRAD", "0")
            .output()
            .expect("run nvp");
        let err = String::from_utf8_lossy(&o.stderr);
        assert!(!o.status.success() && err.contains("NVP_WINOGRAD"), "{err}");
    } else {
        eprintln!("this CPU has no AVX512-BF16: checking the error instead");
        let err = fails(&args);
        assert!(err.contains("AVX512-BF16"), "{err}");
    }
    std::fs::remove_dir_all(&d).ok();
}
