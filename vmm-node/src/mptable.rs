//! Intel MultiProcessor Specification 1.4 table, so that Linux guests find their APs (and
//! the IOAPIC) without ACPI. Written at [`MPTABLE_ADDR`] (the last KiB of base memory, which
//! Linux scans and e820 does not report as RAM).

/// Guest address of the MP floating pointer (the config table follows it).
pub const MPTABLE_ADDR: u64 = 0x9fc00;
/// Physical address of the local APIC.
pub const APIC_ADDR: u32 = 0xfee0_0000;
/// Physical address of the IOAPIC.
pub const IOAPIC_ADDR: u32 = 0xfec0_0000;
/// IOAPIC pins routed (ISA IRQs 0-15 and the virtio slots above them).
pub const IOAPIC_PINS: u8 = 24;

fn checksum(bytes: &[u8]) -> u8 {
    0u8.wrapping_sub(bytes.iter().fold(0u8, |a, b| a.wrapping_add(*b)))
}

/// The MP floating pointer followed by the configuration table for `vcpus` CPUs.
pub fn build(vcpus: u8) -> Vec<u8> {
    let ioapic_id = vcpus; // first id after the CPUs' APIC ids
    let mut entries = Vec::new();
    let mut count: u16 = 0;
    for id in 0..vcpus {
        let mut e = vec![0u8, id, 0x14, 0x01 | if id == 0 { 0x02 } else { 0 }];
        e.extend_from_slice(&0x600u32.to_le_bytes()); // CPU signature (family 6)
        e.extend_from_slice(&0x201u32.to_le_bytes()); // FPU | APIC
        e.extend_from_slice(&[0u8; 8]);
        entries.extend_from_slice(&e);
        count += 1;
    }
    entries.extend_from_slice(&[1, 0, b'I', b'S', b'A', b' ', b' ', b' ']); // bus 0: ISA
    count += 1;
    entries.extend_from_slice(&[2, ioapic_id, 0x11, 0x01]);
    entries.extend_from_slice(&IOAPIC_ADDR.to_le_bytes());
    count += 1;
    for irq in 0..IOAPIC_PINS {
        // I/O interrupt: INT, conforming polarity/trigger, ISA bus irq -> IOAPIC pin irq.
        entries.extend_from_slice(&[3, 0, 0, 0, 0, irq, ioapic_id, irq]);
        count += 1;
    }
    // Local interrupts: ExtINT -> LINT0 of all CPUs, NMI -> LINT1 of all CPUs.
    entries.extend_from_slice(&[4, 3, 0, 0, 0, 0, 0xff, 0]);
    entries.extend_from_slice(&[4, 1, 0, 0, 0, 0, 0xff, 1]);
    count += 2;

    let table_addr = MPTABLE_ADDR as u32 + 16;
    let mut table = Vec::new();
    table.extend_from_slice(b"PCMP");
    table.extend_from_slice(&((44 + entries.len()) as u16).to_le_bytes());
    table.push(4); // spec 1.4
    table.push(0); // checksum, below
    table.extend_from_slice(b"VMMNODE ");
    table.extend_from_slice(b"000000000000");
    table.extend_from_slice(&0u32.to_le_bytes()); // OEM table
    table.extend_from_slice(&0u16.to_le_bytes());
    table.extend_from_slice(&count.to_le_bytes());
    table.extend_from_slice(&APIC_ADDR.to_le_bytes());
    table.extend_from_slice(&0u16.to_le_bytes()); // extended table length
    table.push(0);
    table.push(0);
    debug_assert_eq!(table.len(), 44);
    table.extend_from_slice(&entries);
    table[7] = checksum(&table);

    let mut fp = Vec::with_capacity(16);
    fp.extend_from_slice(b"_MP_");
    fp.extend_from_slice(&table_addr.to_le_bytes());
    fp.push(1); // length in 16-byte units
    fp.push(4); // spec 1.4
    fp.push(0); // checksum, below
    fp.extend_from_slice(&[0u8; 5]); // feature bytes: config table present
    fp[10] = checksum(&fp);

    fp.extend_from_slice(&table);
    fp
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn table_is_well_formed() {
        for vcpus in [1u8, 4, 32] {
            let t = build(vcpus);
            assert!(
                t.len() <= 1024,
                "MP table must fit in the last KiB of base memory"
            );
            let sum = |b: &[u8]| b.iter().fold(0u8, |a, x| a.wrapping_add(*x));
            assert_eq!(&t[..4], b"_MP_");
            assert_eq!(sum(&t[..16]), 0);
            let table = &t[16..];
            assert_eq!(&table[..4], b"PCMP");
            let len = u16::from_le_bytes([table[4], table[5]]) as usize;
            assert_eq!(len, table.len());
            assert_eq!(sum(table), 0);
            let count = u16::from_le_bytes([table[34], table[35]]) as usize;
            assert_eq!(count, vcpus as usize + 1 + 1 + IOAPIC_PINS as usize + 2);
            // Processor entries: ids 0..vcpus, BSP flag only on 0.
            for id in 0..vcpus as usize {
                let e = &table[44 + 20 * id..];
                assert_eq!((e[0], e[1]), (0, id as u8));
                assert_eq!(e[3] & 2 != 0, id == 0);
            }
        }
    }
}
