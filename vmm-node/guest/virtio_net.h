/*
 * Polling virtio-net driver for the test guest (virtio-mmio, register layout version 2,
 * VIRTIO_F_VERSION_1). Freestanding C: no libc, no interrupts, no allocation. Runs at
 * CPL3 with identity-mapped memory, so a pointer's value is its guest-physical address.
 *
 * Two split virtqueues of VNET_QUEUE_SIZE entries: receive (0) with one device-writable
 * buffer of VNET_BUF_BYTES per descriptor, always all posted, and transmit (1) with one
 * device-readable buffer per descriptor (header and frame together). The driver never
 * enables interrupts (VRING_AVAIL_F_NO_INTERRUPT) and polls the used rings.
 *
 * Features taken when offered: VERSION_1, MAC, MTU, STATUS and CSUM (the driver may send
 * frames with a partial checksum: vnet_tx_send's csum arguments).
 */
#ifndef VMM_GUEST_VIRTIO_NET_H
#define VMM_GUEST_VIRTIO_NET_H

#include <stdint.h>

/* virtio-mmio NIC slots of the VMM: slot i at VNET_SLOT_BASE + i * VNET_SLOT_STRIDE. */
#define VNET_SLOTS 4u
#define VNET_SLOT_BASE 0xd0008000ul
#define VNET_SLOT_STRIDE 0x1000ul
/* Entries per virtqueue. */
#define VNET_QUEUE_SIZE 16u
/* virtio_net_hdr bytes before every frame. */
#define VNET_HDR_BYTES 12u
/* One buffer: header + a 9000-byte MTU frame with Ethernet and VLAN headers, rounded up. */
#define VNET_BUF_BYTES 9216u
/* Largest frame (without header) a buffer holds. */
#define VNET_FRAME_MAX (VNET_BUF_BYTES - VNET_HDR_BYTES)

#define VNET_F_CSUM (1ull << 0)
#define VNET_F_MTU (1ull << 3)
#define VNET_F_MAC (1ull << 5)
#define VNET_F_STATUS (1ull << 16)
#define VNET_F_VERSION_1 (1ull << 32)

enum {
	VNET_OK = 0,
	VNET_ENODEV = -1,    /* no virtio-mmio v2 network device there */
	VNET_EFEATURES = -2, /* feature negotiation failed */
	VNET_EQUEUE = -3,    /* queue setup refused */
	VNET_EBUSY = -4,     /* no free transmit buffer */
	VNET_EINVAL = -5,    /* frame too long or too short */
	VNET_ERESET = -6,    /* the device needs a reset */
};

struct vnet {
	uintptr_t base;
	int slot;
	uint64_t features;
	uint8_t mac[6];
	uint16_t mtu;
	uint16_t rx_used_idx;  /* next receive used entry to consume */
	uint16_t rx_avail_idx; /* next receive avail index to publish */
	uint16_t rx_reposted;  /* buffers re-posted since the last notify */
	uint16_t tx_avail_idx;
	uint16_t tx_used_idx;
	int ready;
};

/* Reset and set up the NIC in slot (0..VNET_SLOTS-1). VNET_OK or a negative code. */
int vnet_init(struct vnet *d, int slot);
/* The next received frame: *frame points at it (after the header), *len is its length and
 * *hdr at its virtio_net_hdr; returns the buffer id (>= 0) to pass to vnet_rx_release,
 * or -1 when nothing arrived. */
int vnet_rx_poll(struct vnet *d, uint8_t **frame, uint32_t *len, const uint8_t **hdr);
/* Give buffer id back to the device (published by vnet_rx_flush). */
void vnet_rx_release(struct vnet *d, int id);
/* Publish released buffers and notify the device if there were any. */
void vnet_rx_flush(struct vnet *d);
/* A free transmit buffer's frame area (VNET_FRAME_MAX bytes), or 0 when all are in flight. */
uint8_t *vnet_tx_buf(struct vnet *d);
/* Send the frame written into the buffer vnet_tx_buf returned. With csum_start >= 0 (only
 * when VNET_F_CSUM was negotiated) the device completes the checksum at
 * csum_start + csum_offset over [csum_start, end). */
int vnet_tx_send(struct vnet *d, uint32_t len, int csum_start, int csum_offset);
/* Whether the slot of d (set up before) still holds a network device. */
int vnet_present(const struct vnet *d);
/* VNET_ERESET when the device asks for a reset, else VNET_OK. */
int vnet_check(struct vnet *d);
const char *vnet_strerror(int err);

#endif
