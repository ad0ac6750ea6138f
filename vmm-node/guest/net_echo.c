/* The test guest's ARP / UDP echo / ICMP echo responder; see net_echo.h. */
#include "net_echo.h"

struct net_counters net_cnt;
static struct vnet nic;
static uint32_t my_ip;
static int was_up;
static int gone_slot = -1;

#define ETH_HLEN 14u
#define ETHERTYPE_IPV4 0x0800u
#define ETHERTYPE_ARP 0x0806u
#define IPPROTO_ICMP 1u
#define IPPROTO_UDP 17u

static inline uint16_t be16(const uint8_t *p) { return (uint16_t)((p[0] << 8) | p[1]); }
static inline uint32_t be32(const uint8_t *p)
{
	return ((uint32_t)p[0] << 24) | ((uint32_t)p[1] << 16) | ((uint32_t)p[2] << 8) | p[3];
}
static inline void put16(uint8_t *p, uint16_t v)
{
	p[0] = (uint8_t)(v >> 8);
	p[1] = (uint8_t)v;
}
static void copy(uint8_t *d, const uint8_t *s, uint32_t n)
{
	while (n--)
		*d++ = *s++;
}

/* One's complement sum of n bytes (big-endian words) added to sum, not folded. */
static uint32_t csum_add(uint32_t sum, const uint8_t *p, uint32_t n)
{
	while (n > 1) {
		sum += be16(p);
		p += 2;
		n -= 2;
		if (sum & 0x80000000u)
			sum = (sum & 0xffff) + (sum >> 16);
	}
	if (n)
		sum += (uint32_t)p[0] << 8;
	return sum;
}
static uint16_t csum_fold(uint32_t sum)
{
	while (sum >> 16)
		sum = (sum & 0xffff) + (sum >> 16);
	return (uint16_t)sum;
}

struct vnet *net_echo_dev(void) { return &nic; }

int net_echo_gone_slot(void) { return gone_slot; }

int net_echo_init(uint32_t ip)
{
	my_ip = ip;
	int rc = VNET_ENODEV;
	for (int s = 0; s < (int)VNET_SLOTS; s++) {
		rc = vnet_init(&nic, s);
		if (rc != VNET_ENODEV)
			break;
	}
	was_up = rc == VNET_OK;
	return rc;
}

/* Reply to an ARP request for our address. */
static void arp(const uint8_t *f, uint32_t len)
{
	if (len < ETH_HLEN + 28)
		return;
	const uint8_t *a = f + ETH_HLEN;
	if (be16(a) != 1 || be16(a + 2) != ETHERTYPE_IPV4 || a[4] != 6 || a[5] != 4 ||
	    be16(a + 6) != 1 || be32(a + 24) != my_ip)
		return;
	uint8_t *o = vnet_tx_buf(&nic);
	if (!o) {
		net_cnt.tx_busy++;
		return;
	}
	copy(o, a + 8, 6);          /* to the requester */
	copy(o + 6, nic.mac, 6);
	put16(o + 12, ETHERTYPE_ARP);
	uint8_t *r = o + ETH_HLEN;
	put16(r, 1);
	put16(r + 2, ETHERTYPE_IPV4);
	r[4] = 6;
	r[5] = 4;
	put16(r + 6, 2);            /* reply */
	copy(r + 8, nic.mac, 6);    /* sender: us */
	copy(r + 14, a + 24, 4);
	copy(r + 18, a + 8, 6);     /* target: the requester */
	copy(r + 24, a + 14, 4);
	for (uint32_t i = ETH_HLEN + 28; i < 60; i++)
		o[i] = 0;
	if (vnet_tx_send(&nic, 60, -1, 0) == VNET_OK) {
		net_cnt.arp++;
		net_cnt.tx++;
	}
}

/* Echo a UDP datagram to port 7 or an ICMP echo request back to its sender. */
static void ipv4(const uint8_t *f, uint32_t len)
{
	if (len < ETH_HLEN + 20)
		return;
	const uint8_t *ip = f + ETH_HLEN;
	uint32_t ihl = (uint32_t)(ip[0] & 0xf) * 4;
	uint32_t tot = be16(ip + 2);
	if ((ip[0] >> 4) != 4 || ihl < 20 || tot < ihl || ETH_HLEN + tot > len ||
	    be32(ip + 16) != my_ip || (be16(ip + 6) & 0x3fff) != 0 /* fragments */)
		return;
	const uint8_t *l4 = ip + ihl;
	uint32_t l4len = tot - ihl;
	int udp = ip[9] == IPPROTO_UDP && l4len >= 8 && be16(l4 + 2) == NET_ECHO_UDP_PORT &&
		  be16(l4 + 4) <= l4len && be16(l4 + 4) >= 8;
	int icmp = ip[9] == IPPROTO_ICMP && l4len >= 8 && l4[0] == 8 && l4[1] == 0;
	if (!udp && !icmp)
		return;
	uint8_t *o = vnet_tx_buf(&nic);
	if (!o) {
		net_cnt.tx_busy++;
		return;
	}
	uint32_t flen = ETH_HLEN + tot;
	copy(o, f + 6, 6);
	copy(o + 6, nic.mac, 6);
	put16(o + 12, ETHERTYPE_IPV4);
	uint8_t *oip = o + ETH_HLEN;
	copy(oip, ip, tot);
	copy(oip + 12, ip + 16, 4);
	copy(oip + 16, ip + 12, 4);
	oip[8] = 64;
	put16(oip + 10, 0);
	put16(oip + 10, (uint16_t)~csum_fold(csum_add(0, oip, ihl)));
	uint8_t *ol4 = oip + ihl;
	int csum_start = -1, csum_offset = 0;
	if (udp) {
		uint32_t ulen = be16(l4 + 4);
		put16(ol4, be16(l4 + 2));
		put16(ol4 + 2, be16(l4));
		put16(ol4 + 6, 0);
		/* Pseudo header: addresses, protocol, UDP length. */
		uint32_t ph = csum_add(0, oip + 12, 8) + IPPROTO_UDP + ulen;
		if (nic.features & VNET_F_CSUM) {
			/* Partial checksum: the field holds the pseudo-header sum, the host finishes. */
			put16(ol4 + 6, csum_fold(ph));
			csum_start = (int)(ETH_HLEN + ihl);
			csum_offset = 6;
		} else {
			uint16_t c = (uint16_t)~csum_fold(csum_add(ph, ol4, ulen));
			put16(ol4 + 6, c ? c : 0xffff);
		}
	} else {
		ol4[0] = 0; /* echo reply */
		put16(ol4 + 2, 0);
		put16(ol4 + 2, (uint16_t)~csum_fold(csum_add(0, ol4, l4len)));
	}
	if (vnet_tx_send(&nic, flen < 60 ? 60 : flen, csum_start, csum_offset) == VNET_OK) {
		if (udp)
			net_cnt.udp_echo++;
		else
			net_cnt.icmp_echo++;
		net_cnt.tx++;
	}
}

int net_echo_tick(void)
{
	if (!my_ip)
		return 0;
	if (was_up && !vnet_present(&nic)) {
		/* Hot remove: the slot answers "no device" now. */
		gone_slot = nic.slot;
		nic.ready = 0;
		was_up = 0;
		return NET_ECHO_GONE;
	}
	if (!was_up) {
		/* Hot add: the first slot holding a network device. */
		for (int s = 0; s < (int)VNET_SLOTS; s++) {
			if (vnet_init(&nic, s) == VNET_OK) {
				was_up = 1;
				return NET_ECHO_CAME_UP;
			}
		}
		return 0;
	}
	if (nic.ready && vnet_check(&nic) != VNET_ERESET)
		return 0;
	/* The device asked for a reset: set it up again. */
	if (vnet_init(&nic, nic.slot) == VNET_OK)
		net_cnt.resets++;
	return 0;
}

int net_echo_poll(void)
{
	if (!nic.ready)
		return 0;
	int n = 0;
	for (; n < (int)VNET_QUEUE_SIZE; n++) {
		uint8_t *f;
		uint32_t len;
		const uint8_t *hdr;
		int id = vnet_rx_poll(&nic, &f, &len, &hdr);
		if (id < 0)
			break;
		net_cnt.rx++;
		if (len >= ETH_HLEN) {
			uint16_t type = be16(f + 12);
			if (type == ETHERTYPE_ARP)
				arp(f, len);
			else if (type == ETHERTYPE_IPV4)
				ipv4(f, len);
			else
				net_cnt.drop++;
		} else {
			net_cnt.drop++;
		}
		vnet_rx_release(&nic, id);
	}
	vnet_rx_flush(&nic);
	return n;
}
