//! `conv_bench` with mimalloc as the global allocator (to measure the allocator's
//! effect: large fresh buffers page-fault under glibc's default mmap threshold).

#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

#[path = "../../../benches/conv.rs"]
mod bench;

fn main() {
    bench::main();
}
