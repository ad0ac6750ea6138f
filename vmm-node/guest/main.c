/*
 * Test guest workloads, running at CPL3 with IOPL=3 (see head.S). Talks to the VMM only
 * through port I/O: COM1 (0x3f8) for console lines, 0x5f0 to sleep, 0x5f4 to exit.
 * Line format and parameters: vmm-node/src/guest_protocol.rs.
 */
typedef unsigned long long u64;
typedef unsigned int u32;
typedef unsigned short u16;
typedef unsigned char u8;

#define COM1 0x3f8
#define SLEEP_PORT 0x5f0
#define EXIT_PORT 0x5f4
#define CPUS_MAX 32
#define WORK_BASE (4ull << 20)
#define GAP_START 0xc0000000ull
#define PAGE 4096ull

#if __has_include("virtio_blk.h")
#include "virtio_blk.h"
#define HAVE_VBLK 1
#else
#define HAVE_VBLK 0
#endif

#include "net_echo.h"

extern char _end[];

void *memset(void *d, int c, unsigned long n)
{
	u8 *p = d;
	while (n--)
		*p++ = (u8)c;
	return d;
}

void *memcpy(void *d, const void *s, unsigned long n)
{
	u8 *p = d;
	const u8 *q = s;
	while (n--)
		*p++ = *q++;
	return d;
}

static inline void outb(u16 port, u8 v) { __asm__ volatile("outb %0, %1" ::"a"(v), "Nd"(port)); }
static inline void outl(u16 port, u32 v) { __asm__ volatile("outl %0, %1" ::"a"(v), "Nd"(port)); }
static inline u8 inb(u16 port)
{
	u8 v;
	__asm__ volatile("inb %1, %0" : "=a"(v) : "Nd"(port));
	return v;
}
static inline u64 rdtsc(void)
{
	u32 lo, hi;
	__asm__ volatile("rdtsc" : "=a"(lo), "=d"(hi));
	return ((u64)hi << 32) | lo;
}
static inline void cpu_relax(void) { __asm__ volatile("pause" ::: "memory"); }
#define READ_ONCE(x) (*(volatile __typeof__(x) *)&(x))
#define WRITE_ONCE(x, v) (*(volatile __typeof__(x) *)&(x) = (v))

/* ---- parameters ---- */
enum { W_IDLE, W_DIRTY, W_MEM, W_DISK, W_BADIO, W_FLOOD, W_CRASH, W_EXIT, W_RESET, W_NET };
static struct {
	int workload;
	u64 wss_mib, rate_mbps, seed, hb_ms, tsc_khz, vcpus, mem_mib;
	u32 net_ip;
} P = { W_IDLE, 16, 100, 1, 100, 1000000, 1, 16, 0 };

/* ---- shared state (lives in guest memory, so it survives snapshot/restore) ---- */
static volatile int go;
static volatile u64 cpus_alive;
static u64 tsc0;
static u64 slice_bytes;
static struct percpu {
	u64 mem_passes, mem_errors, filled, dirty_bytes;
	u64 bad_addr, bad_expected, bad_found;
	u64 pad[1];
} pc[CPUS_MAX];
static u64 hb_seq;
static u64 errors_reported;
static const char *disk_status = "off";
static u64 disk_passes;

/* ---- console ---- */
/* Set while a net guest prints its heartbeat: each console byte is a VM exit (~0.1 ms
 * here), so a whole line would leave the NIC unpolled for 10-25 ms; answer in between. */
static int console_polls_net;
static void putc_(char c)
{
	outb(COM1, (u8)c);
	if (console_polls_net)
		net_echo_poll();
}
static void puts_(const char *s) { while (*s) putc_(*s++); }
static void putu(u64 v)
{
	char b[21];
	int i = 20;
	b[i] = 0;
	do {
		b[--i] = (char)('0' + v % 10);
		v /= 10;
	} while (v);
	puts_(b + i);
}
static void putx(u64 v)
{
	puts_("0x");
	for (int s = 60; s >= 0; s -= 4)
		putc_("0123456789abcdef"[(v >> s) & 15]);
}
static void kv(const char *k, u64 v)
{
	putc_(' ');
	puts_(k);
	putc_('=');
	putu(v);
}
static void kvs(const char *k, const char *v)
{
	putc_(' ');
	puts_(k);
	putc_('=');
	puts_(v);
}

/* ---- time ---- */
static u64 us_since(u64 t0)
{
	u64 d = rdtsc() - t0;
	return (d / P.tsc_khz) * 1000 + ((d % P.tsc_khz) * 1000) / P.tsc_khz;
}
static void sleep_us(u32 us) { outl(SLEEP_PORT, us); }

/* ---- command line ---- */
static int streq_n(const char *a, const char *b, int n)
{
	for (int i = 0; i < n; i++)
		if (a[i] != b[i])
			return 0;
	return 1;
}
/* "a.b.c.d" -> host-order address (0 when malformed). */
static u32 parse_ipv4(const char *s, int n)
{
	u32 ip = 0, part = 0;
	int dots = 0, digits = 0;
	for (int i = 0; i < n; i++) {
		if (s[i] >= '0' && s[i] <= '9' && digits < 3) {
			part = part * 10 + (u32)(s[i] - '0');
			digits++;
		} else if (s[i] == '.' && digits && dots < 3 && part < 256) {
			ip = (ip << 8) | part;
			part = 0;
			digits = 0;
			dots++;
		} else {
			return 0;
		}
	}
	if (dots != 3 || !digits || part > 255)
		return 0;
	return (ip << 8) | part;
}
static u64 parse_u64(const char *s, int n)
{
	u64 v = 0;
	for (int i = 0; i < n && s[i] >= '0' && s[i] <= '9'; i++)
		v = v * 10 + (u64)(s[i] - '0');
	return v;
}
static void parse_cmdline(const char *c)
{
	while (c && *c) {
		while (*c == ' ')
			c++;
		const char *k = c;
		while (*c && *c != '=' && *c != ' ')
			c++;
		int kn = (int)(c - k);
		if (*c != '=')
			continue;
		const char *v = ++c;
		while (*c && *c != ' ')
			c++;
		int vn = (int)(c - v);
#define KEY(name) (kn == (int)sizeof(name) - 1 && streq_n(k, name, kn))
		if (KEY("workload")) {
			if (vn == 5 && streq_n(v, "dirty", 5))
				P.workload = W_DIRTY;
			else if (vn == 3 && streq_n(v, "mem", 3))
				P.workload = W_MEM;
			else if (vn == 4 && streq_n(v, "disk", 4))
				P.workload = W_DISK;
			else if (vn == 5 && streq_n(v, "badio", 5))
				P.workload = W_BADIO;
			else if (vn == 5 && streq_n(v, "flood", 5))
				P.workload = W_FLOOD;
			else if (vn == 5 && streq_n(v, "crash", 5))
				P.workload = W_CRASH;
			else if (vn == 4 && streq_n(v, "exit", 4))
				P.workload = W_EXIT;
			else if (vn == 5 && streq_n(v, "reset", 5))
				P.workload = W_RESET;
			else if (vn == 3 && streq_n(v, "net", 3))
				P.workload = W_NET;
			else
				P.workload = W_IDLE;
		} else if (KEY("wss_mib"))
			P.wss_mib = parse_u64(v, vn);
		else if (KEY("rate_mbps"))
			P.rate_mbps = parse_u64(v, vn);
		else if (KEY("seed"))
			P.seed = parse_u64(v, vn);
		else if (KEY("hb_ms"))
			P.hb_ms = parse_u64(v, vn);
		else if (KEY("tsc_khz"))
			P.tsc_khz = parse_u64(v, vn);
		else if (KEY("vcpus"))
			P.vcpus = parse_u64(v, vn);
		else if (KEY("mem_mib"))
			P.mem_mib = parse_u64(v, vn);
		else if (KEY("net.ip"))
			P.net_ip = parse_ipv4(v, vn);
#undef KEY
	}
}

/* ---- memory workloads ---- */
static u64 pattern(u64 addr)
{
	u64 z = addr + P.seed * 0x9e3779b97f4a7c15ull;
	z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ull;
	z = (z ^ (z >> 27)) * 0x94d049bb133111ebull;
	return z ^ (z >> 31);
}

struct cursor {
	u64 base, end, pos;
	u64 start_tsc;
};

static void cursor_init(struct cursor *c, unsigned cpu)
{
	c->base = WORK_BASE + cpu * slice_bytes;
	c->end = c->base + slice_bytes;
	c->pos = c->base;
	c->start_tsc = rdtsc();
}

#define CHUNK (256ull << 10)

/* One step of work (at most CHUNK bytes); returns 1 if it wants to sleep. */
static int mem_step(unsigned cpu, struct cursor *c)
{
	struct percpu *me = &pc[cpu];
	if (slice_bytes == 0)
		return 1;
	u64 end = c->pos + CHUNK < c->end ? c->pos + CHUNK : c->end;
	if (!me->filled) {
		for (u64 a = c->pos; a < end; a += 8)
			*(volatile u64 *)a = pattern(a);
	} else {
		for (u64 a = c->pos; a < end; a += 8) {
			u64 want = pattern(a), got = *(volatile u64 *)a;
			if (got != want) {
				if (me->mem_errors == 0) {
					me->bad_addr = a;
					me->bad_expected = want;
					me->bad_found = got;
				}
				me->mem_errors++;
			}
		}
	}
	c->pos = end;
	if (c->pos >= c->end) {
		c->pos = c->base;
		if (me->filled)
			me->mem_passes++;
		me->filled = 1;
	}
	return 0;
}

static int dirty_step(unsigned cpu, struct cursor *c)
{
	struct percpu *me = &pc[cpu];
	if (slice_bytes == 0)
		return 1;
	/* bytes allowed so far: rate (MB/s == bytes/us) * elapsed us / cpus */
	u64 allowed = us_since(c->start_tsc) * P.rate_mbps / P.vcpus;
	if (me->dirty_bytes >= allowed)
		return 1;
	u64 stamp = me->dirty_bytes;
	for (u64 a = c->pos; a < c->pos + PAGE; a += 8)
		*(volatile u64 *)a = stamp ^ a;
	me->dirty_bytes += PAGE;
	c->pos += PAGE;
	if (c->pos >= c->end)
		c->pos = c->base;
	return 0;
}

/* Touch ports and MMIO addresses that have no device: the VMM must contain it. */
#define NODEV_MMIO 0xe0000000ull
static u64 badio_rounds, badio_wrong;
static int badio_step(unsigned cpu)
{
	if (cpu != 0)
		return 1;
	outb(0x1234, 0x55);
	outl(0x2000, 0xdeadbeef);
	if (inb(0x4321) != 0xff)
		badio_wrong++;
	*(volatile u32 *)NODEV_MMIO = 0x12345678;
	if (*(volatile u32 *)(NODEV_MMIO + 0x10) != 0xffffffffu)
		badio_wrong++;
	badio_rounds++;
	return 0;
}

static int flood_step(unsigned cpu)
{
	if (cpu != 0)
		return 1;
	for (int i = 0; i < 1000; i++)
		puts_("FLOOD-FLOOD-FLOOD-FLOOD-");
	puts_("\n");
	return 0;
}

/* ---- net workload (BSP only; polling virtio-net driver, see net_echo.h) ---- */
static const char *net_status = "off";
static u64 net_last_busy_tsc;
#define NET_SPIN_US 300
static int net_step(unsigned cpu)
{
	if (cpu != 0 || net_status[0] != 'u')
		return 1;
	if (net_echo_poll() > 0) {
		net_last_busy_tsc = rdtsc();
		return 0;
	}
	/* Keep polling for a while after traffic (latency), then let the caller sleep. */
	if (us_since(net_last_busy_tsc) < NET_SPIN_US) {
		cpu_relax();
		return 0;
	}
	return 1;
}
static void putip(u32 ip)
{
	for (int s = 24; s >= 0; s -= 8) {
		putu((ip >> s) & 0xff);
		if (s)
			putc_('.');
	}
}
static void net_print_up(void)
{
	struct vnet *d = net_echo_dev();
	net_status = "up";
	puts_("NET up");
	kv("slot", (u64)d->slot);
	puts_(" mac=");
	for (int i = 0; i < 6; i++) {
		putc_("0123456789abcdef"[d->mac[i] >> 4]);
		putc_("0123456789abcdef"[d->mac[i] & 15]);
		if (i < 5)
			putc_(':');
	}
	puts_(" ip=");
	putip(P.net_ip);
	kv("mtu", d->mtu);
	puts_(" features=");
	putx(d->features);
	puts_("\n");
}
static void net_start(void)
{
	int rc = P.net_ip ? net_echo_init(P.net_ip) : VNET_ENODEV;
	if (rc != VNET_OK || P.net_ip == 0) {
		net_status = "down";
		puts_("NET down");
		kvs("reason", P.net_ip == 0 ? "no-net.ip" : vnet_strerror(rc));
		puts_("\n");
		return;
	}
	net_print_up();
}
/* Per heartbeat: notice a NIC that appeared or disappeared (hot add / remove). */
static void net_tick(void)
{
	int ev = net_echo_tick();
	if (ev == NET_ECHO_CAME_UP) {
		net_print_up();
	} else if (ev == NET_ECHO_GONE) {
		net_status = "down";
		puts_("NET gone");
		kv("slot", (u64)net_echo_gone_slot());
		puts_("\n");
	}
}

static int work_step(unsigned cpu, struct cursor *c)
{
	switch (P.workload) {
	case W_NET:
		return net_step(cpu);
	case W_BADIO:
		return badio_step(cpu);
	case W_FLOOD:
		return flood_step(cpu);
	case W_MEM:
		return mem_step(cpu, c);
	case W_DIRTY:
		return dirty_step(cpu, c);
	default:
		return 1;
	}
}

/* ---- disk workload (BSP only; uses the polling driver from virtio_blk.h) ---- */
#if HAVE_VBLK
#define DISK_BYTES (64u << 10)
static u8 disk_buf[DISK_BYTES] __attribute__((aligned(4096)));
static void disk_step(void)
{
	int slot = -1;
	for (unsigned s = 0; s < 8; s++)
		if (vblk_probe(s) == 0 && vblk_capacity_sectors(s) * 512 >= DISK_BYTES) {
			slot = (int)s;
			break;
		}
	if (slot < 0) {
		disk_status = "nodisk";
		return;
	}
	u64 pass = disk_passes + 1;
	for (u64 i = 0; i < DISK_BYTES; i += 8)
		*(u64 *)(disk_buf + i) = pattern(i ^ (pass << 32));
	if (vblk_write((unsigned)slot, 0, disk_buf, DISK_BYTES) || vblk_flush((unsigned)slot)) {
		disk_status = "nodisk";
		return;
	}
	memset(disk_buf, 0, DISK_BYTES);
	if (vblk_read((unsigned)slot, 0, disk_buf, DISK_BYTES)) {
		disk_status = "nodisk";
		return;
	}
	for (u64 i = 0; i < DISK_BYTES; i += 8)
		if (*(u64 *)(disk_buf + i) != pattern(i ^ (pass << 32))) {
			disk_status = "bad";
			return;
		}
	if (disk_status[0] != 'b')
		disk_status = "ok";
	disk_passes = pass;
}
#endif

/* ---- heartbeat ---- */
static void heartbeat(void)
{
	u64 passes = 0, errors = 0, dirty = 0, filled = 1;
	for (unsigned i = 0; i < P.vcpus && i < CPUS_MAX; i++) {
		passes += READ_ONCE(pc[i].mem_passes);
		errors += READ_ONCE(pc[i].mem_errors);
		dirty += READ_ONCE(pc[i].dirty_bytes);
		filled &= READ_ONCE(pc[i].filled) ? 1 : 0;
	}
	for (unsigned i = 0; i < P.vcpus && i < CPUS_MAX; i++) {
		if (pc[i].mem_errors && !(errors_reported & (1ull << i))) {
			errors_reported |= 1ull << i;
			puts_("ERR what=mem");
			kv("cpu", i);
			puts_(" addr=");
			putx(pc[i].bad_addr);
			puts_(" expected=");
			putx(pc[i].bad_expected);
			puts_(" found=");
			putx(pc[i].bad_found);
			puts_("\n");
		}
	}
	hb_seq++;
	if (P.workload == W_NET) {
		net_tick(); /* may print a NET line of its own: before the HB line starts */
		console_polls_net = net_status[0] == 'u';
	}
	puts_("HB");
	kv("seq", hb_seq);
	kv("tsc_us", us_since(tsc0));
	kv("cpus", cpus_alive);
	kvs("mem", P.workload != W_MEM ? "off" : errors ? "bad" : filled ? "ok" : "fill");
	kv("mem_passes", passes);
	kv("mem_errors", errors);
	kv("dirty_mib", dirty >> 20);
	kvs("disk", disk_status);
	kv("disk_passes", disk_passes);
	if (P.workload == W_BADIO) {
		kv("badio_rounds", badio_rounds);
		kv("badio_wrong", badio_wrong);
	}
	if (P.workload == W_NET) {
		kvs("net", net_status);
		kv("net_rx", net_cnt.rx);
		kv("net_tx", net_cnt.tx);
		kv("net_arp", net_cnt.arp);
		kv("net_udp", net_cnt.udp_echo);
		kv("net_icmp", net_cnt.icmp_echo);
		kv("net_drop", net_cnt.drop);
		kv("net_busy", net_cnt.tx_busy);
		kv("net_resets", net_cnt.resets);
	}
	puts_("\n");
	console_polls_net = 0;
}

static void run(unsigned cpu)
{
	struct cursor c;
	cursor_init(&c, cpu);
	u64 hb_ticks = P.hb_ms * P.tsc_khz;
	u64 next_hb = rdtsc() + hb_ticks;
	for (;;) {
		int idle = work_step(cpu, &c);
		if (cpu == 0) {
			u64 now = rdtsc();
			if ((long long)(now - next_hb) >= 0) {
#if HAVE_VBLK
				if (P.workload == W_DISK)
					disk_step();
#endif
				heartbeat();
				next_hb += hb_ticks;
				if ((long long)(now - next_hb) >= 0) /* fell behind (e.g. paused) */
					next_hb = now + hb_ticks;
			}
			if (idle && P.workload == W_NET) {
				sleep_us(20);
			} else if (idle) {
				u64 left_us = (next_hb - rdtsc()) / P.tsc_khz * 1000;
				sleep_us(left_us > 1000 ? 1000 : (u32)left_us + 1);
			}
		} else if (idle) {
			sleep_us(1000);
		}
	}
}

void ap_main(unsigned cpu)
{
	while (!go)
		cpu_relax();
	__atomic_fetch_add(&cpus_alive, 1, __ATOMIC_SEQ_CST);
	run(cpu);
}

struct hvm_start_info {
	u32 magic, version, flags, nr_modules;
	u64 modlist_paddr, cmdline_paddr, rsdp_paddr, memmap_paddr;
	u32 memmap_entries, reserved;
};

void bsp_main(struct hvm_start_info *si)
{
	tsc0 = rdtsc();
	if (si->magic == 0x336ec578 && si->cmdline_paddr)
		parse_cmdline((const char *)si->cmdline_paddr);
	if (P.vcpus == 0 || P.vcpus > CPUS_MAX)
		P.vcpus = 1;
	if (P.tsc_khz == 0)
		P.tsc_khz = 1000000;
	if (P.hb_ms == 0)
		P.hb_ms = 100;
	u64 ram_top = P.mem_mib << 20;
	if (ram_top > GAP_START)
		ram_top = GAP_START;
	u64 avail = ram_top > WORK_BASE ? ram_top - WORK_BASE : 0;
	u64 wss = P.wss_mib << 20;
	if (wss > avail)
		wss = avail;
	if (P.workload != W_MEM && P.workload != W_DIRTY)
		wss = 0;
	slice_bytes = (wss / P.vcpus) & ~(PAGE - 1);
	puts_("BOOT");
	kv("vcpus", P.vcpus);
	kv("mem_mib", P.mem_mib);
	static const char *const names[] = { "idle", "dirty", "mem", "disk", "badio", "flood", "crash", "exit", "reset", "net" };
	kvs("workload", names[P.workload]);
	kv("wss_mib", (slice_bytes * P.vcpus) >> 20);
	kv("tsc_khz", P.tsc_khz);
	kv("vblk", HAVE_VBLK);
	puts_("\n");
	if ((u64)_end > WORK_BASE) {
		puts_("ERR what=image-too-big\n");
		outl(EXIT_PORT, 1);
	}
	if (P.workload == W_DISK)
		disk_status = HAVE_VBLK ? "nodisk" : "off";
	if (P.workload == W_NET)
		net_start();
	if (P.workload == W_CRASH)
		__asm__ volatile("ud2"); /* #UD with no IDT: triple fault */
	if (P.workload == W_EXIT)
		outl(EXIT_PORT, (u32)P.seed);
	if (P.workload == W_RESET)
		outb(0x64, 0xfe); /* i8042 CPU reset */
	cpus_alive = 1;
	go = 1;
	run(0);
}
