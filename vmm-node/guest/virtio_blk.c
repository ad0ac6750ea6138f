/*
 * Polling virtio-blk driver for the test guest; see virtio_blk.h.
 *
 * Queue memory layout inside the caller's page (VBLK_QUEUE_SIZE = 8):
 *   0x000 descriptor table (8 x 16 bytes)
 *   0x080 available ring   (flags, idx, ring[8], used_event)
 *   0x100 used ring        (flags, idx, ring[8] of {id, len}, avail_event)
 *   0x200 request header   (type, reserved, sector)
 *   0x210 status byte
 * Every request uses descriptors 0 (header), 1 (data, if any) and 2 (status).
 */
#include "virtio_blk.h"

/* virtio-mmio registers */
#define R_MAGIC 0x000
#define R_VERSION 0x004
#define R_DEVICE_ID 0x008
#define R_DEVICE_FEATURES 0x010
#define R_DEVICE_FEATURES_SEL 0x014
#define R_DRIVER_FEATURES 0x020
#define R_DRIVER_FEATURES_SEL 0x024
#define R_QUEUE_SEL 0x030
#define R_QUEUE_NUM_MAX 0x034
#define R_QUEUE_NUM 0x038
#define R_QUEUE_READY 0x044
#define R_QUEUE_NOTIFY 0x050
#define R_INTERRUPT_STATUS 0x060
#define R_INTERRUPT_ACK 0x064
#define R_STATUS 0x070
#define R_QUEUE_DESC_LOW 0x080
#define R_QUEUE_DESC_HIGH 0x084
#define R_QUEUE_DRIVER_LOW 0x090
#define R_QUEUE_DRIVER_HIGH 0x094
#define R_QUEUE_DEVICE_LOW 0x0a0
#define R_QUEUE_DEVICE_HIGH 0x0a4
#define R_CONFIG_GENERATION 0x0fc
#define R_CONFIG 0x100

#define MAGIC 0x74726976u
#define DEVICE_ID_BLOCK 2u

#define S_ACKNOWLEDGE 1u
#define S_DRIVER 2u
#define S_DRIVER_OK 4u
#define S_FEATURES_OK 8u
#define S_NEEDS_RESET 0x40u
#define S_FAILED 0x80u

#define F_BLK_RO (1ull << 5)
#define F_BLK_FLUSH (1ull << 9)
#define F_VERSION_1 (1ull << 32)

#define T_IN 0u
#define T_OUT 1u
#define T_FLUSH 4u
#define T_GET_ID 8u

#define BLK_S_OK 0u
#define BLK_S_IOERR 1u
#define BLK_S_UNSUPP 2u

#define DESC_F_NEXT 1u
#define DESC_F_WRITE 2u

#define OFF_DESC 0x000u
#define OFF_AVAIL 0x080u
#define OFF_USED 0x100u
#define OFF_HDR 0x200u
#define OFF_STATUS 0x210u

/* Polls of the used ring before giving up (the VMM completes during the notify exit). */
#define POLL_MAX 100000000u

struct vq_desc {
	uint64_t addr;
	uint32_t len;
	uint16_t flags;
	uint16_t next;
};

struct vq_avail {
	uint16_t flags;
	uint16_t idx;
	uint16_t ring[VBLK_QUEUE_SIZE];
	uint16_t used_event;
};

struct vq_used_elem {
	uint32_t id;
	uint32_t len;
};

struct vq_used {
	uint16_t flags;
	uint16_t idx;
	struct vq_used_elem ring[VBLK_QUEUE_SIZE];
	uint16_t avail_event;
};

struct blk_hdr {
	uint32_t type;
	uint32_t reserved;
	uint64_t sector;
};

_Static_assert(sizeof(struct vq_desc) == 16, "descriptor layout");
_Static_assert(sizeof(struct vq_avail) <= OFF_USED - OFF_AVAIL, "avail ring fits");
_Static_assert(sizeof(struct vq_used) <= OFF_HDR - OFF_USED, "used ring fits");
_Static_assert(OFF_STATUS < VBLK_QUEUE_MEM_BYTES, "queue memory fits");

static inline void barrier(void) { __asm__ volatile("" ::: "memory"); }
static inline void cpu_pause(void) { __asm__ volatile("pause" ::: "memory"); }

static inline uint32_t rd32(const struct vblk *d, uint32_t off)
{
	return *(volatile uint32_t *)(d->base + off);
}

static inline void wr32(const struct vblk *d, uint32_t off, uint32_t v)
{
	*(volatile uint32_t *)(d->base + off) = v;
}

static inline volatile struct vq_desc *descs(const struct vblk *d)
{
	return (volatile struct vq_desc *)(d->qmem + OFF_DESC);
}

static inline volatile struct vq_avail *avail(const struct vblk *d)
{
	return (volatile struct vq_avail *)(d->qmem + OFF_AVAIL);
}

static inline volatile struct vq_used *used(const struct vblk *d)
{
	return (volatile struct vq_used *)(d->qmem + OFF_USED);
}

static uint64_t device_features(const struct vblk *d)
{
	wr32(d, R_DEVICE_FEATURES_SEL, 1);
	uint64_t hi = rd32(d, R_DEVICE_FEATURES);
	wr32(d, R_DEVICE_FEATURES_SEL, 0);
	uint64_t lo = rd32(d, R_DEVICE_FEATURES);
	return (hi << 32) | lo;
}

static void set_addr(const struct vblk *d, uint32_t low_reg, const volatile void *p)
{
	uint64_t a = (uint64_t)(uintptr_t)p;
	wr32(d, low_reg, (uint32_t)a);
	wr32(d, low_reg + 4, (uint32_t)(a >> 32));
}

/* Read capacity and read-only consistently (virtio 1.x §2.4.1). */
static void read_config(struct vblk *d)
{
	uint32_t before, after;
	uint64_t cap;
	do {
		before = rd32(d, R_CONFIG_GENERATION);
		cap = (uint64_t)rd32(d, R_CONFIG) | ((uint64_t)rd32(d, R_CONFIG + 4) << 32);
		after = rd32(d, R_CONFIG_GENERATION);
	} while (before != after);
	d->capacity = cap;
	d->config_gen = after;
	d->read_only = (device_features(d) & F_BLK_RO) != 0;
}

int vblk_init(struct vblk *d, uintptr_t mmio_base, void *queue_mem)
{
	d->base = mmio_base;
	d->qmem = (uint8_t *)queue_mem;
	d->avail_idx = 0;
	d->used_idx = 0;
	d->capacity = 0;
	d->features = 0;
	d->read_only = 0;
	d->ready = 0;
	if (((uintptr_t)queue_mem & 0xfff) != 0)
		return VBLK_EINVAL;
	if (rd32(d, R_MAGIC) != MAGIC || rd32(d, R_VERSION) != 2 ||
	    rd32(d, R_DEVICE_ID) != DEVICE_ID_BLOCK)
		return VBLK_ENODEV;

	wr32(d, R_STATUS, 0);
	wr32(d, R_STATUS, S_ACKNOWLEDGE);
	wr32(d, R_STATUS, S_ACKNOWLEDGE | S_DRIVER);
	uint64_t offered = device_features(d);
	if (!(offered & F_VERSION_1)) {
		wr32(d, R_STATUS, S_ACKNOWLEDGE | S_DRIVER | S_FAILED);
		return VBLK_EFEATURES;
	}
	uint64_t want = offered & (F_VERSION_1 | F_BLK_FLUSH | F_BLK_RO);
	wr32(d, R_DRIVER_FEATURES_SEL, 0);
	wr32(d, R_DRIVER_FEATURES, (uint32_t)want);
	wr32(d, R_DRIVER_FEATURES_SEL, 1);
	wr32(d, R_DRIVER_FEATURES, (uint32_t)(want >> 32));
	wr32(d, R_STATUS, S_ACKNOWLEDGE | S_DRIVER | S_FEATURES_OK);
	if (!(rd32(d, R_STATUS) & S_FEATURES_OK)) {
		wr32(d, R_STATUS, S_ACKNOWLEDGE | S_DRIVER | S_FAILED);
		return VBLK_EFEATURES;
	}
	d->features = want;

	wr32(d, R_QUEUE_SEL, 0);
	if (rd32(d, R_QUEUE_READY) != 0 || rd32(d, R_QUEUE_NUM_MAX) < VBLK_QUEUE_SIZE) {
		wr32(d, R_STATUS, S_ACKNOWLEDGE | S_DRIVER | S_FEATURES_OK | S_FAILED);
		return VBLK_EQUEUE;
	}
	avail(d)->flags = 1; /* VRING_AVAIL_F_NO_INTERRUPT: we poll */
	avail(d)->idx = 0;
	used(d)->flags = 0;
	used(d)->idx = 0;
	barrier();
	wr32(d, R_QUEUE_NUM, VBLK_QUEUE_SIZE);
	set_addr(d, R_QUEUE_DESC_LOW, descs(d));
	set_addr(d, R_QUEUE_DRIVER_LOW, avail(d));
	set_addr(d, R_QUEUE_DEVICE_LOW, used(d));
	wr32(d, R_QUEUE_READY, 1);
	if (rd32(d, R_QUEUE_READY) != 1) {
		wr32(d, R_STATUS, S_ACKNOWLEDGE | S_DRIVER | S_FEATURES_OK | S_FAILED);
		return VBLK_EQUEUE;
	}
	wr32(d, R_STATUS, S_ACKNOWLEDGE | S_DRIVER | S_FEATURES_OK | S_DRIVER_OK);
	read_config(d);
	d->ready = 1;
	return VBLK_OK;
}

int vblk_refresh(struct vblk *d)
{
	if (!d->ready)
		return VBLK_ENODEV;
	uint32_t isr = rd32(d, R_INTERRUPT_STATUS);
	if (isr)
		wr32(d, R_INTERRUPT_ACK, isr);
	if (rd32(d, R_STATUS) & S_NEEDS_RESET) {
		d->ready = 0;
		return VBLK_ERESET;
	}
	uint32_t old_gen = d->config_gen;
	uint64_t old_cap = d->capacity;
	read_config(d);
	return d->config_gen != old_gen || d->capacity != old_cap;
}

uint64_t vblk_capacity(struct vblk *d)
{
	if (vblk_refresh(d) < 0)
		return 0;
	return d->capacity;
}

/* Post header [+ data] + status, notify, poll. data may be 0 (no data descriptor). */
static int submit(struct vblk *d, uint32_t type, uint64_t sector, void *data, uint32_t len,
		  int device_writes_data)
{
	if (!d->ready)
		return VBLK_ENODEV;
	volatile struct blk_hdr *hdr = (volatile struct blk_hdr *)(d->qmem + OFF_HDR);
	volatile uint8_t *status = d->qmem + OFF_STATUS;
	volatile struct vq_desc *t = descs(d);

	hdr->type = type;
	hdr->reserved = 0;
	hdr->sector = sector;
	*status = 0xff;

	uint16_t n = 0;
	t[n].addr = (uint64_t)(uintptr_t)hdr;
	t[n].len = sizeof(struct blk_hdr);
	t[n].flags = DESC_F_NEXT;
	t[n].next = (uint16_t)(n + 1);
	n++;
	if (data) {
		t[n].addr = (uint64_t)(uintptr_t)data;
		t[n].len = len;
		t[n].flags = (uint16_t)(DESC_F_NEXT | (device_writes_data ? DESC_F_WRITE : 0));
		t[n].next = (uint16_t)(n + 1);
		n++;
	}
	t[n].addr = (uint64_t)(uintptr_t)status;
	t[n].len = 1;
	t[n].flags = DESC_F_WRITE;
	t[n].next = 0;

	avail(d)->ring[d->avail_idx % VBLK_QUEUE_SIZE] = 0;
	barrier();
	d->avail_idx++;
	avail(d)->idx = d->avail_idx;
	barrier();
	wr32(d, R_QUEUE_NOTIFY, 0);

	uint32_t polls = 0;
	while (used(d)->idx == d->used_idx) {
		if (++polls >= POLL_MAX) {
			d->ready = 0; /* ring state unknown: force a re-init */
			return VBLK_ETIMEDOUT;
		}
		if ((polls & 0xfff) == 0 && (rd32(d, R_STATUS) & S_NEEDS_RESET)) {
			d->ready = 0;
			return VBLK_ERESET;
		}
		cpu_pause();
	}
	barrier();
	uint32_t id = used(d)->ring[d->used_idx % VBLK_QUEUE_SIZE].id;
	d->used_idx++;
	if (id != 0)
		return VBLK_EPROTO;
	switch (*status) {
	case BLK_S_OK:
		return VBLK_OK;
	case BLK_S_UNSUPP:
		return VBLK_EUNSUPP;
	case BLK_S_IOERR:
		return VBLK_EIO;
	default:
		return VBLK_EPROTO;
	}
}

int vblk_rw(struct vblk *d, int write, uint64_t sector, void *buf, uint32_t nsect)
{
	if (nsect == 0 || nsect > VBLK_MAX_SECTORS)
		return VBLK_EINVAL;
	if (write && d->read_only)
		return VBLK_EINVAL;
	return submit(d, write ? T_OUT : T_IN, sector, buf, nsect * VBLK_SECTOR_BYTES, !write);
}

int vblk_flush_dev(struct vblk *d)
{
	return submit(d, T_FLUSH, 0, 0, 0, 0);
}

int vblk_get_id(struct vblk *d, char id[VBLK_ID_BYTES])
{
	return submit(d, T_GET_ID, 0, id, VBLK_ID_BYTES, 1);
}

const char *vblk_strerror(int err)
{
	switch (err) {
	case VBLK_OK: return "ok";
	case VBLK_EIO: return "ioerr";
	case VBLK_EUNSUPP: return "unsupp";
	case VBLK_ENODEV: return "nodev";
	case VBLK_EFEATURES: return "features";
	case VBLK_EQUEUE: return "queue";
	case VBLK_ETIMEDOUT: return "timeout";
	case VBLK_ENOMEDIUM: return "nomedium";
	case VBLK_EINVAL: return "inval";
	case VBLK_ERESET: return "reset";
	case VBLK_EPROTO: return "proto";
	default: return "unknown";
	}
}

/* ---- slot-indexed layer ---- */

static struct vblk slots[VBLK_SLOTS];
static uint8_t slot_qmem[VBLK_SLOTS][VBLK_QUEUE_MEM_BYTES] __attribute__((aligned(4096)));

struct vblk *vblk_slot(unsigned slot)
{
	return slot < VBLK_SLOTS ? &slots[slot] : 0;
}

int vblk_probe(unsigned slot)
{
	struct vblk *d = vblk_slot(slot);
	if (!d)
		return VBLK_EINVAL;
	if (d->ready) {
		int r = vblk_refresh(d);
		if (r >= 0)
			return VBLK_OK;
	}
	return vblk_init(d, VBLK_SLOT_BASE + slot * VBLK_SLOT_STRIDE, slot_qmem[slot]);
}

uint64_t vblk_capacity_sectors(unsigned slot)
{
	struct vblk *d = vblk_slot(slot);
	return d && d->ready ? d->capacity : 0;
}

static int slot_rw(unsigned slot, int write, uint64_t sector, void *buf, uint32_t bytes)
{
	struct vblk *d = vblk_slot(slot);
	if (!d || bytes == 0 || bytes % VBLK_SECTOR_BYTES != 0)
		return VBLK_EINVAL;
	if (!d->ready)
		return VBLK_ENODEV;
	if (d->capacity == 0)
		return VBLK_ENOMEDIUM;
	uint8_t *p = (uint8_t *)buf;
	uint32_t nsect = bytes / VBLK_SECTOR_BYTES;
	while (nsect) {
		uint32_t n = nsect < VBLK_MAX_SECTORS ? nsect : VBLK_MAX_SECTORS;
		int r = vblk_rw(d, write, sector, p, n);
		if (r)
			return r;
		nsect -= n;
		sector += n;
		p += (uint64_t)n * VBLK_SECTOR_BYTES;
	}
	return VBLK_OK;
}

int vblk_read(unsigned slot, uint64_t sector, void *buf, uint32_t bytes)
{
	return slot_rw(slot, 0, sector, buf, bytes);
}

int vblk_write(unsigned slot, uint64_t sector, const void *buf, uint32_t bytes)
{
	return slot_rw(slot, 1, sector, (void *)(uintptr_t)buf, bytes);
}

int vblk_flush_slot(unsigned slot)
{
	struct vblk *d = vblk_slot(slot);
	if (!d)
		return VBLK_EINVAL;
	return vblk_flush_dev(d);
}
