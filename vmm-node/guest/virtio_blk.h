/*
 * Polling virtio-blk driver for the test guest (virtio-mmio, register layout version 2,
 * VIRTIO_F_VERSION_1). Freestanding C: no libc, no interrupts, no allocation. Runs at
 * CPL3 with identity-mapped memory, so a pointer's value is its guest-physical address.
 *
 * One split virtqueue per device, one request in flight at a time: the driver posts a
 * chain (header, data, status), writes QueueNotify and polls the used ring. The VMM
 * serves the request during the QueueNotify exit, so the poll normally succeeds at once.
 *
 * Hot-plug: a slot always answers as a block device; capacity 0 means "no disk".
 * vblk_refresh() re-reads the configuration (consistently, using the configuration
 * generation) and tells whether it changed, so the guest notices hot-add/remove
 * without interrupts.
 */
#ifndef VMM_GUEST_VIRTIO_BLK_H
#define VMM_GUEST_VIRTIO_BLK_H

#include <stdint.h>

#define VBLK_SECTOR_BYTES 512u
/* Bytes of page-aligned scratch memory vblk_init() needs for the ring and header. */
#define VBLK_QUEUE_MEM_BYTES 4096u
/* Entries in the virtqueue the driver sets up. */
#define VBLK_QUEUE_SIZE 8u
/* Largest single request (the device's limit is 32 MiB). */
#define VBLK_MAX_SECTORS 65536u
/* virtio-mmio slots of the VMM: slot i at VBLK_SLOT_BASE + i * VBLK_SLOT_STRIDE. */
#define VBLK_SLOTS 8u
#define VBLK_SLOT_BASE 0xd0000000ul
#define VBLK_SLOT_STRIDE 0x1000ul
#define VBLK_ID_BYTES 20u

/* Return codes (negative on failure). */
enum {
	VBLK_OK = 0,
	VBLK_EIO = -1,        /* device reported VIRTIO_BLK_S_IOERR (also: no disk in slot) */
	VBLK_EUNSUPP = -2,    /* device reported VIRTIO_BLK_S_UNSUPP */
	VBLK_ENODEV = -3,     /* no virtio-mmio v2 block device at this address */
	VBLK_EFEATURES = -4,  /* feature negotiation failed */
	VBLK_EQUEUE = -5,     /* queue setup refused */
	VBLK_ETIMEDOUT = -6,  /* the request did not complete */
	VBLK_ENOMEDIUM = -7,  /* capacity is 0 (empty slot) */
	VBLK_EINVAL = -8,     /* bad argument (length, range, alignment, read-only write) */
	VBLK_ERESET = -9,     /* the device needs a reset; call vblk_init() again */
	VBLK_EPROTO = -10,    /* the used ring returned something unexpected */
};

struct vblk {
	uintptr_t base;         /* MMIO window */
	uint8_t *qmem;          /* VBLK_QUEUE_MEM_BYTES of page-aligned scratch */
	uint16_t avail_idx;     /* next avail->idx to publish */
	uint16_t used_idx;      /* next used->idx to consume */
	uint32_t config_gen;    /* generation of the cached configuration */
	uint64_t capacity;      /* sectors, 0 = no disk */
	uint64_t features;      /* negotiated */
	int read_only;          /* VIRTIO_BLK_F_RO offered at the last refresh */
	int ready;              /* vblk_init() succeeded */
};

/* Reset and set up the device at mmio_base. 0 or a negative VBLK_E* code. */
int vblk_init(struct vblk *d, uintptr_t mmio_base, void *queue_mem);
/* Re-read the configuration; returns the capacity in sectors (0 = no disk). */
uint64_t vblk_capacity(struct vblk *d);
/* Re-read the configuration; 1 if it changed since the last read, 0 if not, <0 on error
 * (VBLK_ERESET when the device needs a reset). Acknowledges pending interrupts. */
int vblk_refresh(struct vblk *d);
/* Read (write = 0) or write (write = 1) nsect sectors at sector through buf. */
int vblk_rw(struct vblk *d, int write, uint64_t sector, void *buf, uint32_t nsect);
/* Make every completed write durable (VIRTIO_BLK_T_FLUSH). */
int vblk_flush_dev(struct vblk *d);
/* The device id string (VIRTIO_BLK_ID_BYTES bytes, zero padded, maybe unterminated). */
int vblk_get_id(struct vblk *d, char id[VBLK_ID_BYTES]);
/* Short name of a return code. */
const char *vblk_strerror(int err);

/*
 * Slot-indexed convenience layer over the VMM's fixed slots (static state and queue
 * memory per slot). vblk_probe() initialises the slot on first use, re-initialises it
 * after a device reset and refreshes the capacity; it returns 0 when the slot holds a
 * block device (possibly empty: check vblk_capacity_sectors()).
 */
int vblk_probe(unsigned slot);
uint64_t vblk_capacity_sectors(unsigned slot);
/* bytes must be a multiple of VBLK_SECTOR_BYTES. */
int vblk_read(unsigned slot, uint64_t sector, void *buf, uint32_t bytes);
int vblk_write(unsigned slot, uint64_t sector, const void *buf, uint32_t bytes);
int vblk_flush_slot(unsigned slot);
struct vblk *vblk_slot(unsigned slot);

/* vblk_flush(d) for a struct vblk *, vblk_flush(slot) for a slot number. */
#define vblk_flush(x) _Generic((x), struct vblk *: vblk_flush_dev, default: vblk_flush_slot)(x)

#endif
