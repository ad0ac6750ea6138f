//! Builds the test guest (`guest/*.S`, `guest/*.c`) into a PVH ELF with the system C
//! compiler (`$CC` or `cc`) and exposes its path as `VMM_TEST_GUEST_PATH`.

use std::path::{Path, PathBuf};
use std::process::Command;

const CFLAGS: &[&str] = &[
    "-ffreestanding",
    "-nostdlib",
    "-static",
    "-fno-pic",
    "-fno-pie",
    "-mno-red-zone",
    "-mgeneral-regs-only",
    "-fno-stack-protector",
    "-fno-asynchronous-unwind-tables",
    "-fno-builtin",
    "-O2",
    "-Wall",
    "-Werror",
];

fn run(cmd: &mut Command) {
    let status = cmd
        .status()
        .unwrap_or_else(|e| panic!("cannot run {cmd:?}: {e} (a C compiler `cc` is required)"));
    assert!(status.success(), "{cmd:?} failed with {status}");
}

fn main() {
    let guest = Path::new("guest");
    let out = PathBuf::from(std::env::var("OUT_DIR").expect("OUT_DIR"));
    let cc = std::env::var("CC").unwrap_or_else(|_| "cc".to_string());
    println!("cargo:rerun-if-env-changed=CC");
    println!("cargo:rerun-if-changed=guest");
    let mut sources: Vec<PathBuf> = std::fs::read_dir(guest)
        .expect("vmm-node/guest exists")
        .map(|e| e.expect("readable guest dir").path())
        .filter(|p| matches!(p.extension().and_then(|e| e.to_str()), Some("S" | "c")))
        .collect();
    sources.sort();
    let mut objects = Vec::new();
    for src in &sources {
        println!("cargo:rerun-if-changed={}", src.display());
        let obj = out.join(format!(
            "{}.o",
            src.file_name()
                .and_then(|n| n.to_str())
                .expect("utf-8 name")
        ));
        run(Command::new(&cc)
            .args(CFLAGS)
            .arg("-I")
            .arg(guest)
            .arg("-c")
            .arg(src)
            .arg("-o")
            .arg(&obj));
        objects.push(obj);
    }
    let elf = out.join("vmm-test-guest.elf");
    run(Command::new(&cc)
        .args(["-nostdlib", "-static", "-no-pie"])
        .arg(format!("-Wl,-T,{}", guest.join("guest.ld").display()))
        .args([
            "-Wl,--build-id=none",
            "-Wl,-z,noexecstack",
            "-Wl,--no-warn-rwx-segments",
        ])
        .args(&objects)
        .arg("-o")
        .arg(&elf));
    println!("cargo:rerun-if-changed=guest/guest.ld");
    println!("cargo:rustc-env=VMM_TEST_GUEST_PATH={}", elf.display());
}
