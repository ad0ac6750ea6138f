//! Linux boot path with the Debian cloud kernel (`scripts/fetch-test-kernel.sh`).
//!
//! On these machines KVM is software (PVM) and guest kernel code runs ~2500x slower, so
//! the test checks the kernel's first console lines, not a full boot. Full boot needs a
//! hardware KVM host (see ARCHITECTURE.md).

mod common;

use std::path::PathBuf;
use std::time::{Duration, Instant};

use common::require_kvm;
use vmm_node::boot::BootEntry;
use vmm_node::{BootProtocol, Vm, VmConfig, VmStatus};

fn kernel_dir() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../target/test-kernel")
}

/// The bzImage (`VMM_TEST_LINUX_KERNEL` or the fetch script's default location, fetched
/// on demand). Panics loudly when it cannot be had.
fn bzimage() -> PathBuf {
    if let Ok(p) = std::env::var("VMM_TEST_LINUX_KERNEL") {
        let p = PathBuf::from(p);
        assert!(
            p.exists(),
            "VMM_TEST_LINUX_KERNEL={} does not exist",
            p.display()
        );
        return p;
    }
    let out = std::process::Command::new(
        PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("scripts/fetch-test-kernel.sh"),
    )
    .arg(kernel_dir())
    .output()
    .expect("running scripts/fetch-test-kernel.sh");
    assert!(
        out.status.success(),
        "fetching the Debian cloud kernel failed (set VMM_TEST_LINUX_KERNEL or run \
         vmm-node/scripts/fetch-test-kernel.sh): {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let p = PathBuf::from(String::from_utf8_lossy(&out.stdout).trim().to_string());
    assert!(
        p.exists(),
        "fetch script printed a missing path {}",
        p.display()
    );
    p
}

/// The uncompressed vmlinux ELF next to the bzImage's package (`VMM_TEST_LINUX_VMLINUX`
/// or extracted by the fetch script).
fn vmlinux() -> PathBuf {
    if let Ok(p) = std::env::var("VMM_TEST_LINUX_VMLINUX") {
        return PathBuf::from(p);
    }
    let bz = bzimage();
    let p = bz.parent().unwrap().parent().unwrap().join("vmlinux");
    assert!(
        p.exists(),
        "{} missing: the fetch script could not extract vmlinux from {}",
        p.display(),
        bz.display()
    );
    p
}

fn linux_config(kernel: PathBuf) -> VmConfig {
    let mut c = VmConfig::new(1, 256, kernel);
    c.boot = BootProtocol::Linux;
    c.cmdline = "console=ttyS0 earlyprintk=serial,ttyS0,115200 loglevel=8".into();
    c
}

#[test]
fn vmlinux_boots_with_the_linux_protocol_and_prints_its_banner() {
    require_kvm();
    let mut cfg = linux_config(vmlinux());
    cfg.vcpus = 2;
    let vm = Vm::create(cfg).expect("create Linux VM");
    assert!(matches!(
        vm.boot_setup().unwrap().entry,
        BootEntry::Linux { entry: 0x100_0000 }
    ));
    vm.start().unwrap();
    let deadline = Instant::now() + Duration::from_secs(240);
    loop {
        let text = vm.console().text();
        if text.contains("Linux version 6.") && text.contains("ACPI: APIC 0x00000000000E0400") {
            // Our e820 map, command line and ACPI tables (MADT with both vCPUs) reached it.
            assert!(text.contains("ACPI: RSDP 0x00000000000E0000"), "{text}");
            assert!(text.contains("ACPI: FACP 0x00000000000E0100"), "{text}");
            assert!(
                text.contains("Command line: console=ttyS0 earlyprintk=serial"),
                "{text}"
            );
            assert!(
                text.contains("BIOS-e820: [mem 0x0000000000100000-0x000000000fffffff] usable"),
                "{text}"
            );
            break;
        }
        if let VmStatus::Stopped { reason } = vm.status() {
            panic!("Linux stopped ({reason:?}) before its banner; console:\n{text}");
        }
        assert!(
            Instant::now() < deadline,
            "no Linux banner and ACPI tables within 240 s; console:\n{text}"
        );
        // Paces the console poll.
        std::thread::sleep(Duration::from_millis(200));
    }
    vm.destroy().unwrap();
}

#[test]
fn vmlinux_boots_through_its_pvh_entry() {
    require_kvm();
    let mut cfg = linux_config(vmlinux());
    cfg.boot = BootProtocol::Pvh;
    let vm = Vm::create(cfg).expect("create PVH Linux VM");
    assert!(matches!(
        vm.boot_setup().unwrap().entry,
        BootEntry::Pvh {
            test_guest: None,
            ..
        }
    ));
    vm.start().unwrap();
    let deadline = Instant::now() + Duration::from_secs(240);
    loop {
        let text = vm.console().text();
        // start_info's command line, memory map and RSDP reached the kernel.
        if text.contains("Linux version 6.") && text.contains("ACPI: APIC 0x00000000000E0400") {
            assert!(
                text.contains("Command line: console=ttyS0 earlyprintk=serial"),
                "{text}"
            );
            assert!(
                text.contains("BIOS-e820: [mem 0x0000000000100000-0x000000000fffffff] usable"),
                "{text}"
            );
            break;
        }
        if let VmStatus::Stopped { reason } = vm.status() {
            panic!("Linux stopped ({reason:?}) early; console:\n{text}");
        }
        assert!(
            Instant::now() < deadline,
            "no banner/ACPI within 240 s; console:\n{text}"
        );
        // Paces the console poll.
        std::thread::sleep(Duration::from_millis(200));
    }
    vm.destroy().unwrap();
}

#[test]
fn bzimage_loads_with_the_linux_protocol_and_runs() {
    require_kvm();
    let vm = Vm::create(linux_config(bzimage())).expect("create Linux VM from bzImage");
    // 64-bit entry of a bzImage: protected-mode code at 1 MiB + 0x200.
    assert!(matches!(
        vm.boot_setup().unwrap().entry,
        BootEntry::Linux { entry: 0x10_0200 }
    ));
    vm.start().unwrap();
    // The decompressor runs in emulated CPL0 here (minutes before its first line, so
    // there is no event to wait for); check that it runs without faulting for a while.
    std::thread::sleep(Duration::from_secs(3));
    assert_eq!(vm.status(), VmStatus::Running);
    vm.pause().unwrap();
    let st = vm.save_state().unwrap();
    let rip = st.vcpus[0].regs.rip;
    assert!(rip != 0x10_0200, "vCPU did not execute");
    vm.destroy().unwrap();
}
