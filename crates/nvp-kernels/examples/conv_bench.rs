//! The convolution benchmark of the workspace (`benches/conv.rs`, run with
//! `cargo bench --bench conv`), also runnable from this crate:
//! `cargo run --release -p nvp-kernels --example conv_bench`.

#[path = "../../../benches/conv.rs"]
mod bench;

fn main() {
    bench::main();
}
