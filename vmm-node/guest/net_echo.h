/*
 * The test guest's network responder over the polling virtio-net driver: answers ARP
 * requests for its IPv4 address, UDP datagrams to port 7 (echo: the payload comes back)
 * and ICMP echo requests. Counters feed the heartbeat line.
 */
#ifndef VMM_GUEST_NET_ECHO_H
#define VMM_GUEST_NET_ECHO_H

#include <stdint.h>
#include "virtio_net.h"

#define NET_ECHO_UDP_PORT 7u

struct net_counters {
	uint64_t rx, tx, arp, udp_echo, icmp_echo, drop, tx_busy, resets;
};

extern struct net_counters net_cnt;

/* Find the first NIC slot with a network device and set it up; ip is host order. */
int net_echo_init(uint32_t ip);
/* Serve up to a queue's worth of received frames; returns how many were handled. */
int net_echo_poll(void);
/* Check the device (MMIO reads: call it rarely, e.g. per heartbeat): re-initialise it
 * when it asked for a reset, drop it when its slot became empty (hot remove) and, while
 * there is none, set up the first slot that holds a network device (hot add; virtio-mmio
 * has no hot-plug notification, the slots are polled). Returns NET_ECHO_CAME_UP when a
 * NIC was set up, NET_ECHO_GONE when the NIC in use disappeared, else 0. */
int net_echo_tick(void);
#define NET_ECHO_CAME_UP 1
#define NET_ECHO_GONE (-1)
/* The slot of the NIC that disappeared last (valid after NET_ECHO_GONE). */
int net_echo_gone_slot(void);
/* The NIC in use (valid after net_echo_init returned VNET_OK). */
struct vnet *net_echo_dev(void);

#endif
