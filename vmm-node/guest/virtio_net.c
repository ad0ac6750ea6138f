/*
 * Polling virtio-net driver for the test guest; see virtio_net.h.
 *
 * Per queue one page: descriptor table at 0x000 (16 x 16 bytes), available ring at 0x100,
 * used ring at 0x200. Receive descriptor i always points at receive buffer i; transmit
 * descriptor i at transmit buffer i, used in order (tx_avail_idx % size).
 */
#include "virtio_net.h"

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
#define R_STATUS 0x070
#define R_QUEUE_DESC_LOW 0x080
#define R_QUEUE_DRIVER_LOW 0x090
#define R_QUEUE_DEVICE_LOW 0x0a0
#define R_CONFIG 0x100

#define MAGIC 0x74726976u
#define DEVICE_ID_NET 1u

#define S_ACKNOWLEDGE 1u
#define S_DRIVER 2u
#define S_DRIVER_OK 4u
#define S_FEATURES_OK 8u
#define S_NEEDS_RESET 0x40u
#define S_FAILED 0x80u

#define DESC_F_WRITE 2u
#define HDR_F_NEEDS_CSUM 1u

#define RXQ 0u
#define TXQ 1u

struct vq_desc {
	uint64_t addr;
	uint32_t len;
	uint16_t flags;
	uint16_t next;
};
struct vq_avail {
	uint16_t flags;
	uint16_t idx;
	uint16_t ring[VNET_QUEUE_SIZE];
	uint16_t used_event;
};
struct vq_used_elem {
	uint32_t id;
	uint32_t len;
};
struct vq_used {
	uint16_t flags;
	uint16_t idx;
	struct vq_used_elem ring[VNET_QUEUE_SIZE];
	uint16_t avail_event;
};

_Static_assert(sizeof(struct vq_desc) * VNET_QUEUE_SIZE <= 0x100, "descriptor table fits");
_Static_assert(sizeof(struct vq_avail) <= 0x100, "avail ring fits");
_Static_assert(sizeof(struct vq_used) <= 0x100, "used ring fits");

/* Queue pages and buffers per slot would be 4 x 300 KiB; the guest drives one NIC, so
 * they are shared: only the last vnet_init()ed NIC may be used. */
static uint8_t qmem[2][4096] __attribute__((aligned(4096)));
static uint8_t rxbuf[VNET_QUEUE_SIZE][VNET_BUF_BYTES] __attribute__((aligned(64)));
static uint8_t txbuf[VNET_QUEUE_SIZE][VNET_BUF_BYTES] __attribute__((aligned(64)));

static inline void barrier(void) { __asm__ volatile("" ::: "memory"); }

static inline uint32_t rd32(const struct vnet *d, uint32_t off)
{
	return *(volatile uint32_t *)(d->base + off);
}
static inline void wr32(const struct vnet *d, uint32_t off, uint32_t v)
{
	*(volatile uint32_t *)(d->base + off) = v;
}
static inline uint8_t rd8(const struct vnet *d, uint32_t off)
{
	return *(volatile uint8_t *)(d->base + off);
}
static inline volatile struct vq_desc *descs(unsigned q) { return (volatile struct vq_desc *)qmem[q]; }
static inline volatile struct vq_avail *avail(unsigned q) { return (volatile struct vq_avail *)(qmem[q] + 0x100); }
static inline volatile struct vq_used *used(unsigned q) { return (volatile struct vq_used *)(qmem[q] + 0x200); }

static void set_addr(const struct vnet *d, uint32_t low_reg, const volatile void *p)
{
	uint64_t a = (uint64_t)(uintptr_t)p;
	wr32(d, low_reg, (uint32_t)a);
	wr32(d, low_reg + 4, (uint32_t)(a >> 32));
}

static int setup_queue(struct vnet *d, unsigned q)
{
	wr32(d, R_QUEUE_SEL, q);
	if (rd32(d, R_QUEUE_READY) != 0 || rd32(d, R_QUEUE_NUM_MAX) < VNET_QUEUE_SIZE)
		return VNET_EQUEUE;
	uint8_t *page = qmem[q];
	for (unsigned i = 0; i < sizeof(qmem[q]); i++)
		page[i] = 0;
	avail(q)->flags = 1; /* VRING_AVAIL_F_NO_INTERRUPT: we poll */
	wr32(d, R_QUEUE_NUM, VNET_QUEUE_SIZE);
	set_addr(d, R_QUEUE_DESC_LOW, descs(q));
	set_addr(d, R_QUEUE_DRIVER_LOW, avail(q));
	set_addr(d, R_QUEUE_DEVICE_LOW, used(q));
	wr32(d, R_QUEUE_READY, 1);
	return rd32(d, R_QUEUE_READY) == 1 ? VNET_OK : VNET_EQUEUE;
}

int vnet_present(const struct vnet *d)
{
	return rd32(d, R_MAGIC) == MAGIC && rd32(d, R_DEVICE_ID) == DEVICE_ID_NET;
}

int vnet_init(struct vnet *d, int slot)
{
	d->ready = 0;
	d->slot = slot;
	d->base = VNET_SLOT_BASE + (uintptr_t)slot * VNET_SLOT_STRIDE;
	d->rx_used_idx = d->rx_avail_idx = d->rx_reposted = 0;
	d->tx_used_idx = d->tx_avail_idx = 0;
	if (slot < 0 || (unsigned)slot >= VNET_SLOTS)
		return VNET_ENODEV;
	if (rd32(d, R_MAGIC) != MAGIC || rd32(d, R_VERSION) != 2 ||
	    rd32(d, R_DEVICE_ID) != DEVICE_ID_NET)
		return VNET_ENODEV;
	wr32(d, R_STATUS, 0);
	wr32(d, R_STATUS, S_ACKNOWLEDGE);
	wr32(d, R_STATUS, S_ACKNOWLEDGE | S_DRIVER);
	wr32(d, R_DEVICE_FEATURES_SEL, 1);
	uint64_t offered = (uint64_t)rd32(d, R_DEVICE_FEATURES) << 32;
	wr32(d, R_DEVICE_FEATURES_SEL, 0);
	offered |= rd32(d, R_DEVICE_FEATURES);
	if (!(offered & VNET_F_VERSION_1)) {
		wr32(d, R_STATUS, S_ACKNOWLEDGE | S_DRIVER | S_FAILED);
		return VNET_EFEATURES;
	}
	uint64_t want = offered & (VNET_F_VERSION_1 | VNET_F_MAC | VNET_F_MTU | VNET_F_STATUS | VNET_F_CSUM);
	wr32(d, R_DRIVER_FEATURES_SEL, 0);
	wr32(d, R_DRIVER_FEATURES, (uint32_t)want);
	wr32(d, R_DRIVER_FEATURES_SEL, 1);
	wr32(d, R_DRIVER_FEATURES, (uint32_t)(want >> 32));
	wr32(d, R_STATUS, S_ACKNOWLEDGE | S_DRIVER | S_FEATURES_OK);
	if (!(rd32(d, R_STATUS) & S_FEATURES_OK)) {
		wr32(d, R_STATUS, S_ACKNOWLEDGE | S_DRIVER | S_FAILED);
		return VNET_EFEATURES;
	}
	d->features = want;
	for (int i = 0; i < 6; i++)
		d->mac[i] = (want & VNET_F_MAC) ? rd8(d, R_CONFIG + (uint32_t)i) : (uint8_t)(i == 0 ? 2 : i);
	d->mtu = (want & VNET_F_MTU) ? (uint16_t)(rd8(d, R_CONFIG + 10) | (rd8(d, R_CONFIG + 11) << 8)) : 1500;
	if (d->mtu > VNET_FRAME_MAX - 18)
		d->mtu = VNET_FRAME_MAX - 18;
	int rc = setup_queue(d, RXQ);
	if (rc == VNET_OK)
		rc = setup_queue(d, TXQ);
	if (rc != VNET_OK) {
		wr32(d, R_STATUS, S_ACKNOWLEDGE | S_DRIVER | S_FEATURES_OK | S_FAILED);
		return rc;
	}
	/* Post every receive buffer. */
	for (unsigned i = 0; i < VNET_QUEUE_SIZE; i++) {
		descs(RXQ)[i].addr = (uint64_t)(uintptr_t)rxbuf[i];
		descs(RXQ)[i].len = VNET_BUF_BYTES;
		descs(RXQ)[i].flags = DESC_F_WRITE;
		descs(RXQ)[i].next = 0;
		avail(RXQ)->ring[i] = (uint16_t)i;
		descs(TXQ)[i].addr = (uint64_t)(uintptr_t)txbuf[i];
		descs(TXQ)[i].flags = 0;
		descs(TXQ)[i].next = 0;
	}
	barrier();
	d->rx_avail_idx = VNET_QUEUE_SIZE;
	avail(RXQ)->idx = d->rx_avail_idx;
	barrier();
	wr32(d, R_STATUS, S_ACKNOWLEDGE | S_DRIVER | S_FEATURES_OK | S_DRIVER_OK);
	wr32(d, R_QUEUE_NOTIFY, RXQ);
	d->ready = 1;
	return VNET_OK;
}

int vnet_check(struct vnet *d)
{
	if (rd32(d, R_STATUS) & S_NEEDS_RESET) {
		d->ready = 0;
		return VNET_ERESET;
	}
	return VNET_OK;
}

int vnet_rx_poll(struct vnet *d, uint8_t **frame, uint32_t *len, const uint8_t **hdr)
{
	if (!d->ready || used(RXQ)->idx == d->rx_used_idx)
		return -1;
	barrier();
	volatile struct vq_used_elem *e = &used(RXQ)->ring[d->rx_used_idx % VNET_QUEUE_SIZE];
	uint32_t id = e->id, n = e->len;
	d->rx_used_idx++;
	if (id >= VNET_QUEUE_SIZE)
		return -1;
	if (n < VNET_HDR_BYTES || n > VNET_BUF_BYTES)
		n = VNET_HDR_BYTES;
	*hdr = rxbuf[id];
	*frame = rxbuf[id] + VNET_HDR_BYTES;
	*len = n - VNET_HDR_BYTES;
	return (int)id;
}

void vnet_rx_release(struct vnet *d, int id)
{
	if (id < 0 || (unsigned)id >= VNET_QUEUE_SIZE)
		return;
	avail(RXQ)->ring[d->rx_avail_idx % VNET_QUEUE_SIZE] = (uint16_t)id;
	d->rx_avail_idx++;
	d->rx_reposted++;
}

void vnet_rx_flush(struct vnet *d)
{
	if (!d->rx_reposted)
		return;
	barrier();
	avail(RXQ)->idx = d->rx_avail_idx;
	d->rx_reposted = 0;
	/* The device asks for a notification only while it waits for buffers
	 * (VRING_USED_F_NO_NOTIFY clear); the fence orders our index store before the flag load,
	 * as the device orders its flag store before its index load. */
	__atomic_thread_fence(__ATOMIC_SEQ_CST);
	if (!(used(RXQ)->flags & 1))
		wr32(d, R_QUEUE_NOTIFY, RXQ);
}

uint8_t *vnet_tx_buf(struct vnet *d)
{
	if (!d->ready)
		return 0;
	d->tx_used_idx = used(TXQ)->idx;
	if ((uint16_t)(d->tx_avail_idx - d->tx_used_idx) >= VNET_QUEUE_SIZE)
		return 0;
	return txbuf[d->tx_avail_idx % VNET_QUEUE_SIZE] + VNET_HDR_BYTES;
}

int vnet_tx_send(struct vnet *d, uint32_t len, int csum_start, int csum_offset)
{
	if (!d->ready)
		return VNET_ERESET;
	if ((uint16_t)(d->tx_avail_idx - used(TXQ)->idx) >= VNET_QUEUE_SIZE)
		return VNET_EBUSY;
	if (len < 14 || len > VNET_FRAME_MAX)
		return VNET_EINVAL;
	unsigned i = d->tx_avail_idx % VNET_QUEUE_SIZE;
	uint8_t *h = txbuf[i];
	for (unsigned k = 0; k < VNET_HDR_BYTES; k++)
		h[k] = 0;
	if (csum_start >= 0 && (d->features & VNET_F_CSUM)) {
		h[0] = HDR_F_NEEDS_CSUM;
		h[6] = (uint8_t)csum_start;
		h[7] = (uint8_t)(csum_start >> 8);
		h[8] = (uint8_t)csum_offset;
		h[9] = (uint8_t)(csum_offset >> 8);
	}
	descs(TXQ)[i].len = VNET_HDR_BYTES + len;
	avail(TXQ)->ring[i] = (uint16_t)i;
	barrier();
	d->tx_avail_idx++;
	avail(TXQ)->idx = d->tx_avail_idx;
	barrier();
	wr32(d, R_QUEUE_NOTIFY, TXQ);
	return VNET_OK;
}

const char *vnet_strerror(int err)
{
	switch (err) {
	case VNET_OK:
		return "ok";
	case VNET_ENODEV:
		return "nodev";
	case VNET_EFEATURES:
		return "features";
	case VNET_EQUEUE:
		return "queue";
	case VNET_EBUSY:
		return "busy";
	case VNET_EINVAL:
		return "inval";
	case VNET_ERESET:
		return "reset";
	default:
		return "unknown";
	}
}
