// DNS answer hold (agent/dns/hold.py, for `stockade run --dns-egress`): a tc clsact EGRESS classifier on a pod's
// host-side veth (egress there = towards the pod). A UDP datagram from port 53, and every TCP
// segment from port 53 except a bare SYN (IPv4, or IPv6 without extension headers; not a
// non-first fragment), is redirected to the agent's TAP device instead of the pod. All of a
// TCP flow's segments take that one path, so they stay in order: the agent reassembles the
// length-prefixed messages and holds the segment that completes one until it has learned.
// The agent reads each frame, learns from it, and writes the frame back
// on the veth with an AF_PACKET socket set to PACKET_QDISC_BYPASS, which skips the qdisc
// layer and so this hook: the released answer is never redirected again.
//
// Fail-open by heartbeat: the agent keeps `dnshold[CFG_DEADLINE]` (CLOCK_MONOTONIC ns, what
// bpf_ktime_get_ns reads) a little in the future. Past it -- the agent is down or stuck --
// answers are no longer held: passed unchanged, or dropped when `CFG_FAIL_CLOSED` is set
// (the pod's resolver then retries until the agent is back). Compiled by bcc.

#include <uapi/linux/bpf.h>
#include <uapi/linux/if_ether.h>
#include <uapi/linux/in.h>
#include <uapi/linux/ip.h>
#include <uapi/linux/ipv6.h>
#include <uapi/linux/pkt_cls.h>
#include <uapi/linux/tcp.h>
#include <uapi/linux/udp.h>

// Slots of the one array map: configuration written by the agent, then counters.
#define CFG_DEADLINE 0     // hold while bpf_ktime_get_ns() <= this
#define CFG_FAIL_CLOSED 1  // 1: past the deadline, drop answers instead of passing them
#define CFG_TAP 2          // ifindex of the agent's TAP device (0: hold nothing)
#define ST_HELD 3          // answers redirected to the agent
#define ST_UNHELD 4        // answers passed because the heartbeat had stopped
#define ST_DROPPED 5       // answers dropped because the heartbeat had stopped (fail closed)
#define ST_HELD_TCP 6      // of ST_HELD: TCP segments
#define SLOTS 8

BPF_ARRAY(dnshold, u64, SLOTS);

static __always_inline u64 slot(int k) {
    u64 *v = dnshold.lookup(&k);
    return v ? *v : 0;
}

static __always_inline void count(int k) {
    u64 *v = dnshold.lookup(&k);
    if (v)
        __sync_fetch_and_add(v, 1);
}

// 0: not an answer; 1: a UDP datagram from port 53; 2: a TCP segment from port 53 other than
// a bare SYN (a connection opened FROM port 53 is no answer: the dataplane checks it as usual).
static __always_inline int answer_kind(struct __sk_buff *skb) {
    void *data = (void *)(long)skb->data;
    void *end = (void *)(long)skb->data_end;
    struct ethhdr *eth = data;
    if ((void *)(eth + 1) > end)
        return 0;
    void *l4;
    u8 proto;
    if (eth->h_proto == htons(ETH_P_IP)) {
        struct iphdr *ip = (void *)(eth + 1);
        if ((void *)(ip + 1) > end || ip->ihl < 5)
            return 0;
        if (ip->frag_off & htons(0x1FFF))
            return 0;  // a non-first fragment: no transport header to read
        proto = ip->protocol;
        l4 = (void *)ip + ip->ihl * 4;
    } else if (eth->h_proto == htons(ETH_P_IPV6)) {
        struct ipv6hdr *ip6 = (void *)(eth + 1);
        if ((void *)(ip6 + 1) > end)
            return 0;
        proto = ip6->nexthdr;
        l4 = (void *)(ip6 + 1);
    } else {
        return 0;
    }
    if (proto == IPPROTO_UDP) {
        struct udphdr *udp = l4;
        if ((void *)(udp + 1) > end)
            return 0;
        return udp->source == htons(53) ? 1 : 0;
    }
    if (proto == IPPROTO_TCP) {
        struct tcphdr *tcp = l4;
        if ((void *)(tcp + 1) > end || tcp->source != htons(53))
            return 0;
        return (tcp->syn && !tcp->ack) ? 0 : 2;
    }
    return 0;
}

int dnshold_egress(struct __sk_buff *skb) {
    int kind = answer_kind(skb);
    if (!kind)
        return TC_ACT_OK;
    u64 tap = slot(CFG_TAP);
    if (tap == 0)
        return TC_ACT_OK;
    if (bpf_ktime_get_ns() > slot(CFG_DEADLINE)) {
        if (slot(CFG_FAIL_CLOSED)) {
            count(ST_DROPPED);
            return TC_ACT_SHOT;
        }
        count(ST_UNHELD);
        return TC_ACT_OK;
    }
    count(ST_HELD);
    if (kind == 2)
        count(ST_HELD_TCP);
    return bpf_redirect(tap, 0);
}
