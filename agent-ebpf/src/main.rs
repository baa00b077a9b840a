//! The agent's kernel programs. One module per hook family; each program is a
//! thin entry around a `try_*` function. Built for `bpfel-unknown-none` by the
//! agent's `build.rs` and embedded in `zt-agent`.
#![no_std]
#![no_main]

mod creds;
mod dns;
mod exec;
mod file;
mod guard;
mod lifecycle;
mod maps;
mod net;
mod task;

#[cfg(not(test))]
#[panic_handler]
fn panic(_info: &core::panic::PanicInfo) -> ! {
    // The verifier rejects any program that could reach this.
    loop {}
}

#[unsafe(link_section = "license")]
#[unsafe(no_mangle)]
static LICENSE: [u8; 4] = *b"GPL\0";
