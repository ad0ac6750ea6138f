/*
 * Test guest CPL0 stub. Entered through the Xen PVH note in 32-bit flat protected mode
 * with paging off and %ebx = hvm_start_info. It loads a GDT, enables PAE + long mode on
 * static identity page tables (first 4 GiB, 2 MiB pages, user-accessible), loads a TSS,
 * and iretq's to CPL3 with IOPL=3 in bsp_main(start_info). The TSS also carries an
 * all-zero I/O permission bitmap: the software KVM (PVM) drops IOPL on an emulated iretq,
 * and the bitmap still lets CPL3 code use every port. Application processors never
 * run this code: the VMM starts them directly in CPL3 at ap_main(cpu) using the header
 * below (see vmm-node/src/boot.rs).
 */
#define STACK_BYTES 16384
#define CPUS_MAX 32

	/* Header read by the VMM at the image base (0x100000). */
	.section .head, "a"
	.long 0x44484754          /* magic "TGHD" */
	.long 1                   /* header version */
	.quad pml4
	.quad gdt
	.quad gdt_end - gdt - 1
	.quad tss
	.quad ap_main
	.quad stacks
	.quad STACK_BYTES
	.quad CPUS_MAX

	/* PVH entry note. */
	.section .note.Xen, "a", @note
	.align 4
	.long 4                   /* namesz */
	.long 4                   /* descsz */
	.long 18                  /* XEN_ELFNOTE_PHYS32_ENTRY */
	.asciz "Xen"
	.align 4
	.long pvh_entry

	.section .text.entry, "ax"
	.code32
	.globl pvh_entry
pvh_entry:
	cli
	mov %ebx, %esi
	lgdt gdt_ptr
	/* TSS base into its descriptor. */
	mov $tss, %eax
	mov %ax, gdt_tss + 2
	shr $16, %eax
	mov %al, gdt_tss + 4
	mov %ah, gdt_tss + 7
	/* CR4: PAE | OSFXSR | OSXMMEXCPT */
	mov $0x620, %eax
	mov %eax, %cr4
	mov $pml4, %eax
	mov %eax, %cr3
	/* EFER.LME */
	mov $0xc0000080, %ecx
	rdmsr
	or $0x100, %eax
	wrmsr
	/* CR0: PG | NE | ET | MP | PE */
	mov $0x80000033, %eax
	mov %eax, %cr0
	ljmp $0x08, $long_entry

	.code64
long_entry:
	mov $0x10, %ax
	mov %ax, %ds
	mov %ax, %es
	mov %ax, %ss
	mov %ax, %fs
	mov %ax, %gs
	mov $0x28, %ax
	ltr %ax
	mov $boot_stack_top, %esp            /* kernel stack for the iretq frame */
	mov %esi, %edi                       /* bsp_main(start_info) */
	pushq $0x1b                          /* user SS */
	pushq $(stacks + STACK_BYTES - 8)    /* user RSP (cpu 0) */
	pushq $0x3002                        /* RFLAGS: IOPL=3, IF=0 */
	pushq $0x23                          /* user CS */
	pushq $bsp_main
	iretq

	.section .data
	.align 16
gdt:
	.quad 0
	.quad 0x00af9a000000ffff   /* 0x08 kernel code64 */
	.quad 0x00cf92000000ffff   /* 0x10 kernel data */
	.quad 0x00cff2000000ffff   /* 0x18 user data (DPL3) */
	.quad 0x00affa000000ffff   /* 0x20 user code64 (DPL3) */
gdt_tss:
	.quad 0x0000890000002068   /* 0x28 TSS (base patched at boot) */
	.quad 0
gdt_end:
	.align 8
gdt_ptr:
	.word gdt_end - gdt - 1
	.long gdt

	.align 16
	.globl tss
tss:
	.fill 102, 1, 0
	.word 104                  /* I/O bitmap offset: all ports allowed */
	.fill 8192, 1, 0
	.byte 0xff

	.align 4096
pml4:
	.quad pdpt + 0x7
	.fill 511, 8, 0
pdpt:
	.quad pd0 + 0x7
	.quad pd0 + 0x1000 + 0x7
	.quad pd0 + 0x2000 + 0x7
	.quad pd0 + 0x3000 + 0x7
	.fill 508, 8, 0
pd0:
	.set i, 0
	.rept 2048
	.quad (i << 21) | 0x87     /* present, writable, user, 2 MiB */
	.set i, i + 1
	.endr

	.section .bss
	.align 4096
boot_stack:
	.skip 4096
boot_stack_top:
	.globl stacks
stacks:
	.skip STACK_BYTES * CPUS_MAX
