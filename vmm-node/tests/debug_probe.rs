mod common;
use std::time::Duration;
use vmm_node::guest_protocol::{Workload, WorkloadKind};

#[test]
fn probe() {
    let _ = tracing_subscriber::fmt().with_test_writer().try_init();
    let vm = common::start_test_guest(1, 32, &Workload::new(WorkloadKind::Idle));
    std::thread::sleep(Duration::from_secs(2));
    println!("status {:?}", vm.status());
    if vm.pause().is_ok() {
        let st = vm.save_state().unwrap();
        let r = &st.vcpus[0].regs;
        let s = &st.vcpus[0].sregs;
        println!(
            "rip {:#x} rsp {:#x} rflags {:#x} cs {:?} cr0 {:#x} cr4 {:#x} efer {:#x}",
            r.rip, r.rsp, r.rflags, s.cs, s.cr0, s.cr4, s.efer
        );
    }
    println!("console {:?}", vm.console().text());
}
