//! Minimal ACPI tables so that Linux guests find their CPUs and the IOAPIC (kernels built
//! without `CONFIG_X86_MPPARSE`, like Debian's cloud kernel, ignore the MP table):
//! RSDP → XSDT → { FADT (hardware-reduced, → empty DSDT), MADT (one local APIC per vCPU,
//! the IOAPIC) }. Placed in the BIOS area at [`RSDP_ADDR`], which e820 does not report as RAM.

use crate::mptable::{APIC_ADDR, IOAPIC_ADDR};

/// Guest address of the RSDP (the other tables follow it).
pub const RSDP_ADDR: u64 = 0xe_0000;
const XSDT_ADDR: u64 = RSDP_ADDR + 0x40;
const FADT_ADDR: u64 = RSDP_ADDR + 0x100;
const DSDT_ADDR: u64 = RSDP_ADDR + 0x300;
const MADT_ADDR: u64 = RSDP_ADDR + 0x400;
/// FADT flag: hardware-reduced ACPI (no PM timer, no SCI, no legacy fixed hardware).
const FADT_HW_REDUCED_ACPI: u32 = 1 << 20;

fn checksum(bytes: &[u8]) -> u8 {
    0u8.wrapping_sub(bytes.iter().fold(0u8, |a, b| a.wrapping_add(*b)))
}

/// Standard 36-byte header with a zero checksum; `finish` fixes length and checksum.
fn header(sig: &[u8; 4], revision: u8) -> Vec<u8> {
    let mut h = Vec::with_capacity(36);
    h.extend_from_slice(sig);
    h.extend_from_slice(&0u32.to_le_bytes()); // length, set by finish
    h.push(revision);
    h.push(0); // checksum, set by finish
    h.extend_from_slice(b"VMMNOD"); // OEM ID
    h.extend_from_slice(b"VMMNODE "); // OEM table ID
    h.extend_from_slice(&1u32.to_le_bytes()); // OEM revision
    h.extend_from_slice(b"VMMN"); // creator ID
    h.extend_from_slice(&1u32.to_le_bytes()); // creator revision
    h
}

fn finish(mut t: Vec<u8>) -> Vec<u8> {
    let len = t.len() as u32;
    t[4..8].copy_from_slice(&len.to_le_bytes());
    t[9] = checksum(&t);
    t
}

/// The tables for `vcpus` CPUs, as (guest address, bytes) pairs.
pub fn build(vcpus: u8) -> Vec<(u64, Vec<u8>)> {
    let dsdt = finish(header(b"DSDT", 2));

    let mut fadt = header(b"FACP", 6);
    fadt.resize(276, 0);
    fadt[40..44].copy_from_slice(&(DSDT_ADDR as u32).to_le_bytes()); // DSDT
    fadt[112..116].copy_from_slice(&FADT_HW_REDUCED_ACPI.to_le_bytes()); // flags
    fadt[131] = 3; // FADT minor version (6.3)
    fadt[140..148].copy_from_slice(&DSDT_ADDR.to_le_bytes()); // X_DSDT
    let fadt = finish(fadt);

    let mut madt = header(b"APIC", 4);
    madt.extend_from_slice(&APIC_ADDR.to_le_bytes());
    madt.extend_from_slice(&1u32.to_le_bytes()); // PCAT_COMPAT: dual 8259 present
    for id in 0..vcpus {
        madt.extend_from_slice(&[0, 8, id, id]); // processor local APIC, UID = APIC id
        madt.extend_from_slice(&1u32.to_le_bytes()); // enabled
    }
    madt.extend_from_slice(&[1, 12, vcpus, 0]); // I/O APIC, id after the CPUs
    madt.extend_from_slice(&IOAPIC_ADDR.to_le_bytes());
    madt.extend_from_slice(&0u32.to_le_bytes()); // GSI base
    let madt = finish(madt);

    let mut xsdt = header(b"XSDT", 1);
    xsdt.extend_from_slice(&FADT_ADDR.to_le_bytes());
    xsdt.extend_from_slice(&MADT_ADDR.to_le_bytes());
    let xsdt = finish(xsdt);

    let mut rsdp = Vec::with_capacity(36);
    rsdp.extend_from_slice(b"RSD PTR ");
    rsdp.push(0); // checksum of the first 20 bytes
    rsdp.extend_from_slice(b"VMMNOD");
    rsdp.push(2); // ACPI 2.0+
    rsdp.extend_from_slice(&0u32.to_le_bytes()); // RSDT address (none)
    rsdp.extend_from_slice(&36u32.to_le_bytes());
    rsdp.extend_from_slice(&XSDT_ADDR.to_le_bytes());
    rsdp.push(0); // extended checksum
    rsdp.extend_from_slice(&[0; 3]);
    rsdp[8] = checksum(&rsdp[..20]);
    rsdp[32] = checksum(&rsdp);

    vec![
        (RSDP_ADDR, rsdp),
        (XSDT_ADDR, xsdt),
        (FADT_ADDR, fadt),
        (DSDT_ADDR, dsdt),
        (MADT_ADDR, madt),
    ]
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sum(b: &[u8]) -> u8 {
        b.iter().fold(0u8, |a, x| a.wrapping_add(*x))
    }

    #[test]
    fn tables_are_well_formed_and_linked() {
        for vcpus in [1u8, 2, 32] {
            let tables = build(vcpus);
            // No overlaps.
            for w in tables.windows(2) {
                assert!(w[0].0 + w[0].1.len() as u64 <= w[1].0, "tables overlap");
            }
            assert!(tables.last().map(|(a, b)| a + b.len() as u64).unwrap() <= 0x10_0000);
            let at = |addr: u64| &tables.iter().find(|(a, _)| *a == addr).unwrap().1;
            let rsdp = at(RSDP_ADDR);
            assert_eq!(&rsdp[..8], b"RSD PTR ");
            assert_eq!(sum(&rsdp[..20]), 0);
            assert_eq!(sum(rsdp), 0);
            let xsdt_addr = u64::from_le_bytes(rsdp[24..32].try_into().unwrap());
            let xsdt = at(xsdt_addr);
            assert_eq!(&xsdt[..4], b"XSDT");
            let mut sigs = Vec::new();
            for i in 0..2 {
                let a = u64::from_le_bytes(xsdt[36 + 8 * i..44 + 8 * i].try_into().unwrap());
                let t = at(a);
                assert_eq!(
                    u32::from_le_bytes(t[4..8].try_into().unwrap()) as usize,
                    t.len()
                );
                assert_eq!(sum(t), 0, "checksum of {:?}", &t[..4]);
                sigs.push(t[..4].to_vec());
            }
            assert_eq!(sigs, vec![b"FACP".to_vec(), b"APIC".to_vec()]);
            let madt = at(MADT_ADDR);
            let cpus = madt[44..].chunks(8).take_while(|e| e[0] == 0).count();
            assert_eq!(cpus, vcpus as usize);
            let dsdt = at(DSDT_ADDR);
            assert_eq!((&dsdt[..4], dsdt.len(), sum(dsdt)), (&b"DSDT"[..], 36, 0));
        }
    }
}
