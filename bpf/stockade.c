// Stockade eBPF dataplane: tc (clsact, direct-action) classifiers for the host-side
// interface of every local endpoint. Compiled by bcc in agent/dataplane/ebpf/loader.py;
// the maps are filled by agent/dataplane/ebpf/ (layouts: layout.py, checked against the
// structs below when the loader compiles this file; design notes: docs/ebpf.md).
//
// Per packet: parse (Ethernet or raw IP), find which direction this hook judges on this
// interface (ifcfg), find the local endpoint by its own address (addrs) -- or, on a device
// the node itself sits behind (NetBird's wt0), the endpoint bound to the device when the
// packet is for or from a node address (so it is enforced before its addresses are
// known, as nftables keys it by `iifname`/`oifname`), pass packets of
// known flows and their replies (flows, frags), pass node-originated traffic into the
// endpoint (nodeaddrs), else look up the peer class (peers, LPM) and the first-match
// verdict for (class, protocol, port) (ports, LPM over port prefixes) under the
// endpoint's current generation (epstate) -- for a destination the endpoint learned from
// DNS answers (egress of endpoints with domainNames rules only), the class its `learned`
// entry gives while it lasts. Constant cost: at most 2 flow lookups, 1 learned hash lookup,
// 1 peer LPM and 1 port LPM per judged endpoint, whatever the number of rules or peers.
// A packet of a flow known at both ends, leaving one local pod for another, is vouched for
// by the source's hook (`vouch`: a mark bound to the destination's device); the destination's
// hook then passes it before any hash lookup. With --ebpf-deliver peer such a packet -- and a
// flow's first packet, judged for both ends (`stk_deliver`, tail-called) -- goes straight into
// the destination pod instead (`to_pod`: bpf_redirect_peer, past the node's forwarding).
//
// Atomic updates: `addrs`, `epstate` and `ifcfg` are double-buffered: keyed by a half (0/1)
// of the buffer. A packet reads the active half from `active` once, before any other lookup,
// and uses it for every lookup of its judgement; the agent writes the inactive half, then
// flips `active` with one update. A packet leaving an endpoint for another local endpoint is judged here for both:
// the source's egress and the destination's ingress, under the one half read, and the flow
// is remembered at both, each entry naming the other endpoint (so the destination's own hook
// passes it as a known flow, or is spared it: `vouch`). A packet
// is thus never judged by one endpoint's old tables and another's new ones.
// A packet judged a drop is counted, sampled into the `samples` queue (rate-limited per
// endpoint, direction and CPU), and dropped -- or, in audit mode (`config`), passed and
// remembered like an allowed packet.
//
// Sizes come from the loader as -D defines.

#include <uapi/linux/bpf.h>
#include <uapi/linux/if_ether.h>
#include <uapi/linux/in.h>
#include <uapi/linux/ip.h>
#include <uapi/linux/ipv6.h>
#include <uapi/linux/pkt_cls.h>

#ifndef MAX_ENDPOINTS
#define MAX_ENDPOINTS 4096
#endif
#ifndef MAX_ADDRS
#define MAX_ADDRS 16384
#endif
#ifndef MAX_PEERS
#define MAX_PEERS 262144
#endif
#ifndef MAX_PORTS
#define MAX_PORTS 262144
#endif
#ifndef MAX_FLOWS
#define MAX_FLOWS 65536
#endif
#ifndef MAX_FRAGS
#define MAX_FRAGS 16384
#endif
#ifndef MAX_COUNTERS
#define MAX_COUNTERS 65536
#endif
#ifndef MAX_IFACES
#define MAX_IFACES 4096
#endif
#ifndef MAX_NODE_ADDRS
#define MAX_NODE_ADDRS 1024
#endif
#ifndef MAX_SAMPLES
#define MAX_SAMPLES 1024
#endif
#ifndef MAX_LEARNED
#define MAX_LEARNED 65536
#endif
#define LEARN_STAGES 4

#define DIR_INGRESS 0
#define DIR_EGRESS 1
#define F_ENFORCED 1
#define F_ISOLATED 2
#define F_LEARNED 4  // egress: the endpoint has domainNames rules (consult `learned`)
#define V_ACCEPT 1
#define V_DROP 2

// Protocol codes in port keys: IANA numbers for ported protocols, ICMP for ICMP and
// ICMPv6 alike (the IR's "icmp"), OTHER for anything else.
#define P_OTHER 0
#define P_ICMP 1
#define P_TCP 6
#define P_UDP 17
#define P_SCTP 132

// Sample flags, and the rule counter of a default-deny sample (none)
#define S_AUDIT 1
#define S_PORTS 2
#define NO_COUNTER 0xffffffff

// Flow flags
#define FL_FIN_ORIG 1
#define FL_FIN_REPLY 2

#define NS 1000000000ULL
#define T_TCP (86400ULL * NS)
#define T_TCP_CLOSING (10ULL * NS)
// What this filter lets through goes on to any later filter on the same hook (TC_ACT_UNSPEC;
// with none, the packet passes as with TC_ACT_OK): the DNS hold (bpf/dnshold.c) runs after
// this filter, so it only ever sees answers this filter allowed, and a packet from port 53
// never skips the pod's ingress check.
#define PASS_ON TC_ACT_UNSPEC
#define T_UDP (180ULL * NS)
#define T_OTHER (60ULL * NS)
// A known flow's last-seen time is rewritten only once it is this much older: a packet of
// a busy flow then only reads the shared entry (no store, no cache line bouncing between
// CPUs); a flow expires at most this much early (1% of the shortest timeout, T_TCP_CLOSING).
#define T_SEEN_GRAIN (100ULL * NS / 1000)

struct addr_key {
    u8 family;  // 4 or 6
    u8 half;    // half of the double buffer (addrs); always 0 in nodeaddrs
    u8 pad[2];
    u8 addr[16];
};

struct ep_key {
    u32 ep_id;
    u32 half;  // half of the double buffer
};

struct if_key {
    u32 ifindex;
    u32 half;  // half of the double buffer
};

struct ep_state {
    u32 gen;
    u8 flags[2];  // per direction: F_ENFORCED | F_ISOLATED
    u8 pad[2];
    u32 dev;      // a pod's veth (both its hooks are on it), 0: none or not one device: where
                  // `to_pod` may deliver a packet for it from the first one of a flow
};

struct if_cfg {
    u8 l3;           // 1: raw IP device (TUN), 0: Ethernet
    u8 hook_dir[2];  // direction judged at [0] tc ingress, [1] tc egress
    u8 peer;         // 1: a veth whose other end is in another network namespace (a pod's):
                     // a packet may be handed to that end straight (`to_pod`)
    u32 ep_id;       // endpoint bound to the device (the node behind it), 0: none (pod veths)
};

struct peer_key {
    u32 prefixlen;  // 80 + address prefix length
    u32 ep_id;
    u32 gen;
    u8 dir;
    u8 family;
    u8 addr[16];
} __attribute__((packed));

struct port_key {
    u32 prefixlen;  // 120 + port prefix length (has_port=1), or 136 (has_port=0)
    u32 ep_id;
    u32 gen;
    u32 cls;
    u8 dir;
    u8 proto;
    u8 has_port;  // 0: no port known (ICMP, other, non-first fragment)
    u8 port[2];   // network order: bit prefixes are port ranges
} __attribute__((packed));

struct port_val {
    u32 counter;  // rule_stats index of the deciding rule
    u8 verdict;
    u8 pad[3];
};

// A destination an endpoint learned from DNS answers, under one generation of its tables.
struct learn_key {
    u32 ep_id;
    u32 gen;
    u8 family;
    u8 pad[3];
    u8 addr[16];
};

// Its peer class while each stage lasts: stages in ascending expiry, the class of stage i
// holds the learned rules that outlive stages before it (unused stages: expires 0). The
// first stage not yet expired decides; none: the `peers` LPM class, as if never learned.
struct learn_stage {
    u64 expires;  // bpf_ktime_get_ns() (CLOCK_MONOTONIC) ns
    u32 cls;
    u32 rules;    // the agent's only: which learned rules the class holds (restart adoption)
};

struct learn_val {
    struct learn_stage stage[LEARN_STAGES];
};

struct flow_key {
    u32 ep_id;
    u8 dir;  // direction of the packet that created the flow, at this endpoint
    u8 family;
    u8 proto;
    u8 pad;
    u16 sport;
    u16 dport;
    u8 saddr[16];
    u8 daddr[16];
};

struct flow_val {
    u64 seen;
    u32 flags;
    u32 peer;  // the local endpoint at the flow's other end whose entry was written with this one, 0: none
    u32 dev;   // ifindex of the device whose tc egress hook passed a packet as this entry (judging
               // this endpoint's ingress), 0: not yet: what a vouching mark is bound to
    u32 pad;
};

struct frag_key {
    u32 ep_id;
    u32 id;
    u8 dir;
    u8 family;
    u8 proto;
    u8 pad;
    u8 saddr[16];
    u8 daddr[16];
};

struct stat {
    u64 packets;
    u64 bytes;
};

// Runtime settings written by the agent (one element): no rebuild to change them.
struct config {
    u32 audit;             // 1: judged drops pass (counted and sampled as would-be drops)
    u32 sample_burst;      // drop samples allowed in a burst, per endpoint, direction and CPU
    u64 sample_interval;   // ns between samples after the burst (0: no sampling)
    u32 mark;              // the skb->mark bit of a vouched-for packet (`vouch`), 0: none
    u32 deliver;           // 1: a packet between two local pods goes straight into the destination
                           // pod once judged for both (`to_pod`; --ebpf-deliver peer)
};

// One sampled drop, drained by the agent (agent/dataplane/ebpf/droplog.py).
struct sample {
    u32 ep_id;
    u32 counter;  // rule_stats index of the deciding drop rule, NO_COUNTER for the default deny
    u8 dir;
    u8 family;
    u8 l4;     // IANA protocol number
    u8 flags;  // S_AUDIT | S_PORTS
    u16 sport; // network order
    u16 dport;
    u8 saddr[16];
    u8 daddr[16];
};

// Used by the programs. `active` holds the half of the double buffer that `addrs`,
// `epstate` and `ifcfg` are read under (each holds up to one copy of its entries per half).
BPF_ARRAY(active, u32, 1);
BPF_HASH(addrs, struct addr_key, u32, MAX_ADDRS * 2);
BPF_HASH(epstate, struct ep_key, struct ep_state, MAX_ENDPOINTS * 2);
BPF_HASH(ifcfg, struct if_key, struct if_cfg, MAX_IFACES * 2);
BPF_HASH(nodeaddrs, struct addr_key, u8, MAX_NODE_ADDRS);
BPF_LPM_TRIE(peers, struct peer_key, u32, MAX_PEERS);
BPF_LPM_TRIE(ports, struct port_key, struct port_val, MAX_PORTS);
// Egress destinations learned from DNS answers (domainNames rules): written by the agent's
// `learn` one entry at a time, no generation flip; read only for endpoints flagged F_LEARNED.
BPF_HASH(learned, struct learn_key, struct learn_val, MAX_LEARNED);
// The flow and fragment tables are shared by every build of this source under one pin
// root (their sizes never grow): while maps grow, devices move from one build to the next
// one by one, and a reply judged by the new build must find the flow the old one recorded.
#ifdef FLOWS_PIN
BPF_TABLE_PINNED("lru_hash", struct flow_key, struct flow_val, flows, MAX_FLOWS, FLOWS_PIN);
BPF_TABLE_PINNED("lru_hash", struct frag_key, u64, frags, MAX_FRAGS, FRAGS_PIN);
#else
BPF_TABLE("lru_hash", struct flow_key, struct flow_val, flows, MAX_FLOWS);
BPF_TABLE("lru_hash", struct frag_key, u64, frags, MAX_FRAGS);
#endif
BPF_PERCPU_ARRAY(rule_stats, struct stat, MAX_COUNTERS);
BPF_PERCPU_ARRAY(drop_stats, struct stat, MAX_ENDPOINTS * 2);
BPF_ARRAY(config, struct config, 1);
// The Ethernet addresses of frames from the node to a pod device's pod (the device's address
// as source, the pod's as destination): what a packet handed straight to the pod carries
// (`to_pod`). Learned, with --ebpf-deliver peer, from the frames the node's stack sends there
// (the device's tc egress hook, passing a known flow), else from the pod's own first judged
// frame, the other way round (`stk_deliver`).
struct l2addrs {
    u8 dst[6];
    u8 src[6];
};
BPF_HASH(devmac, u32, struct l2addrs, MAX_IFACES);
// stk_deliver, tail-called by a pod's hook after it judged a packet (`to_pod` for a flow's first
// packet): verified apart from the judging before it (together, past the verifier's budget).
BPF_PROG_ARRAY(tails, 1);
#define TO_KNOWN 0x80000000  // in stk_deliver's cb[0]: the destination's hook would find the flow
// Drop sampling: a GCRA token bucket per (endpoint id * 2 + direction) and CPU (the
// theoretical arrival time of the next sample), and a queue the agent pops; a full
// queue overwrites its oldest sample.
BPF_PERCPU_ARRAY(sample_tat, u64, MAX_ENDPOINTS * 2);
BPF_QUEUE(samples, struct sample, MAX_SAMPLES);

// Bookkeeping for the agent only (restart adoption): endpoint id -> endpoint key,
// rule counter -> (endpoint id, direction, rule id).
struct ep_name {
    char name[256];
};
struct counter_info {
    u32 ep_id;
    u8 dir;
    u8 rule[6];
    u8 pad;
};
BPF_HASH(epkeys, u32, struct ep_name, MAX_ENDPOINTS);
BPF_HASH(counterinfo, u32, struct counter_info, MAX_COUNTERS);

struct pkt {
    u8 family;
    u8 l4;         // IANA protocol number
    u8 proto;      // P_* code
    u8 has_port;   // 1: a transport port was read
    u8 nonfirst;   // non-first fragment: no transport header
    u8 firstfrag;  // first fragment of a fragmented datagram
    u8 related;    // ICMP error: the tuple is the reversed inner header
    u8 bad;        // header chain not understood: never matched by port rules
    u8 tcpflags;
    u8 pad[3];
    u32 fragid;
    u16 sport;
    u16 dport;
    u8 saddr[16];
    u8 daddr[16];
    // tuple used for flow lookups (outer addresses, or the reversed inner ones)
    u16 tsport;
    u16 tdport;
    u8 tproto;
    u8 pad2[3];
    u8 tsaddr[16];
    u8 tdaddr[16];
};

static __always_inline u8 proto_code(u8 l4) {
    switch (l4) {
    case IPPROTO_TCP:
    case IPPROTO_UDP:
    case IPPROTO_SCTP:
        return l4;
    case IPPROTO_ICMP:
    case 58:  // ICMPv6
        return P_ICMP;
    }
    return P_OTHER;
}

static __always_inline int is_ext(u8 nh) {
    return nh == 0 || nh == 43 || nh == 44 || nh == 51 || nh == 60;
}

// Inner header of an ICMP error: the packet our side sent. Fills the flow tuple with it
// reversed, so it is looked up exactly like a reply/continuation of that packet.
static __always_inline int parse_inner(struct __sk_buff *skb, u32 off, struct pkt *p) {
    u8 l4 = 0;
    u32 l4off = 0;
    u8 vb = 0;
    if (bpf_skb_load_bytes(skb, off, &vb, 1) < 0)
        return -1;
    if ((vb >> 4) == 4 && p->family == 4) {
        struct iphdr ip;
        if (bpf_skb_load_bytes(skb, off, &ip, sizeof(ip)) < 0)
            return -1;
        __builtin_memcpy(p->tsaddr, &ip.daddr, 4);
        __builtin_memcpy(p->tdaddr, &ip.saddr, 4);
        l4 = ip.protocol;
        l4off = off + ip.ihl * 4;
    } else if ((vb >> 4) == 6 && p->family == 6) {
        struct ipv6hdr ip6;
        if (bpf_skb_load_bytes(skb, off, &ip6, sizeof(ip6)) < 0)
            return -1;
        __builtin_memcpy(p->tsaddr, &ip6.daddr, 16);
        __builtin_memcpy(p->tdaddr, &ip6.saddr, 16);
        l4 = ip6.nexthdr;
        l4off = off + sizeof(ip6);
    } else {
        return -1;
    }
    p->tproto = proto_code(l4);
    if (l4 == IPPROTO_TCP || l4 == IPPROTO_UDP || l4 == IPPROTO_SCTP) {
        u16 pp[2];
        if (bpf_skb_load_bytes(skb, l4off, pp, 4) < 0)
            return -1;
        p->tsport = pp[1];
        p->tdport = pp[0];
    } else if (l4 == IPPROTO_ICMP || l4 == 58) {
        u8 t[2];
        u16 id = 0;
        if (bpf_skb_load_bytes(skb, l4off, t, 2) < 0)
            return -1;
        bpf_skb_load_bytes(skb, l4off + 4, &id, 2);
        if (t[0] == 8 || t[0] == 128) {  // inner echo request (sport=id, dport=0): reversed
            p->tsport = 0;
            p->tdport = id;
        } else if (t[0] == 0 || t[0] == 129) {
            p->tsport = id;
            p->tdport = 0;
        }
    }
    return 0;
}

static __always_inline int parse(struct __sk_buff *skb, u32 off, struct pkt *p) {
    u8 vb = 0;
    u32 l4off = 0;
    u8 l4 = 0;
    if (bpf_skb_load_bytes(skb, off, &vb, 1) < 0)
        return -1;
    if ((vb >> 4) == 4) {
        struct iphdr ip;
        if (bpf_skb_load_bytes(skb, off, &ip, sizeof(ip)) < 0)
            return -1;
        p->family = 4;
        __builtin_memcpy(p->saddr, &ip.saddr, 4);
        __builtin_memcpy(p->daddr, &ip.daddr, 4);
        u16 fo = bpf_ntohs(ip.frag_off);
        p->nonfirst = (fo & 0x1fff) != 0;
        p->firstfrag = !p->nonfirst && (fo & 0x2000);
        p->fragid = bpf_ntohs(ip.id);
        l4 = ip.protocol;
        if (ip.ihl < 5)
            p->bad = 1;
        l4off = off + ip.ihl * 4;
    } else if ((vb >> 4) == 6) {
        struct ipv6hdr ip6;
        if (bpf_skb_load_bytes(skb, off, &ip6, sizeof(ip6)) < 0)
            return -1;
        p->family = 6;
        __builtin_memcpy(p->saddr, &ip6.saddr, 16);
        __builtin_memcpy(p->daddr, &ip6.daddr, 16);
        u8 nh = ip6.nexthdr;
        l4off = off + sizeof(ip6);
#pragma unroll
        for (int i = 0; i < 8; i++) {
            if (!is_ext(nh))
                break;
            u8 h[8];
            if (bpf_skb_load_bytes(skb, l4off, h, 8) < 0) {
                p->bad = 1;
                break;
            }
            if (nh == 44) {  // fragment header
                u16 fo = ((u16)h[2] << 8) | h[3];
                u32 id = ((u32)h[4] << 24) | ((u32)h[5] << 16) | ((u32)h[6] << 8) | h[7];
                p->nonfirst = (fo & 0xfff8) != 0;
                p->firstfrag = !p->nonfirst && (fo & 1);
                p->fragid = id;
                l4off += 8;
            } else if (nh == 51) {  // AH
                l4off += ((u32)h[1] + 2) * 4;
            } else {
                l4off += ((u32)h[1] + 1) * 8;
            }
            nh = h[0];
            if (p->nonfirst)
                break;
        }
        if (is_ext(nh) && !p->nonfirst)
            p->bad = 1;  // more extension headers than we walk
        l4 = nh;
    } else {
        return -1;
    }
    p->l4 = l4;
    p->proto = proto_code(l4);
    __builtin_memcpy(p->tsaddr, p->saddr, 16);
    __builtin_memcpy(p->tdaddr, p->daddr, 16);
    p->tproto = p->proto;
    if (p->nonfirst || p->bad)
        return 0;
    if (l4 == IPPROTO_TCP || l4 == IPPROTO_UDP || l4 == IPPROTO_SCTP) {
        u16 pp[2];
        if (bpf_skb_load_bytes(skb, l4off, pp, 4) < 0) {
            p->bad = 1;
            return 0;
        }
        p->sport = pp[0];
        p->dport = pp[1];
        p->has_port = 1;
        if (l4 == IPPROTO_TCP)
            bpf_skb_load_bytes(skb, l4off + 13, &p->tcpflags, 1);
    } else if (l4 == IPPROTO_ICMP || l4 == 58) {
        u8 t[2];
        u16 id = 0;
        if (bpf_skb_load_bytes(skb, l4off, t, 2) < 0) {
            p->bad = 1;
            return 0;
        }
        if (l4 == 58 && t[0] >= 133 && t[0] <= 137)
            return 1;  // neighbour discovery: never blocked
        if ((l4 == IPPROTO_ICMP && (t[0] == 8 || t[0] == 0)) || (l4 == 58 && (t[0] == 128 || t[0] == 129))) {
            bpf_skb_load_bytes(skb, l4off + 4, &id, 2);
            if (t[0] == 8 || t[0] == 128)
                p->sport = id;
            else
                p->dport = id;
        } else if ((l4 == IPPROTO_ICMP && (t[0] == 3 || t[0] == 4 || t[0] == 5 || t[0] == 11 || t[0] == 12)) ||
                   (l4 == 58 && t[0] >= 1 && t[0] <= 4)) {
            if (parse_inner(skb, l4off + 8, p) == 0)
                p->related = 1;
            else {  // unparseable error: judged as plain ICMP
                __builtin_memcpy(p->tsaddr, p->saddr, 16);
                __builtin_memcpy(p->tdaddr, p->daddr, 16);
                p->tproto = p->proto;
            }
        }
    }
    if (!p->related) {
        p->tsport = p->sport;
        p->tdport = p->dport;
    }
    return 0;
}

static __always_inline int fresh(struct flow_val *v, u8 proto, u64 now) {
    u64 age = now - v->seen;
    if (proto == P_TCP)
        return age < (((v->flags & 3) == 3) ? T_TCP_CLOSING : T_TCP);
    if (proto == P_UDP || proto == P_SCTP)
        return age < T_UDP;
    return age < T_OTHER;
}

static __always_inline void record(struct pkt *p, struct flow_key *fk, u32 peer) {
    if (p->related || p->nonfirst || p->bad)
        return;
    if (p->tproto == P_TCP && (p->tcpflags & 0x04))  // RST: nothing to remember
        return;
    struct flow_val v = {};
    v.seen = bpf_ktime_get_ns();
    v.peer = peer;
    if (p->tproto == P_TCP && (p->tcpflags & 0x01))
        v.flags = FL_FIN_ORIG;
    flows.update(fk, &v);
}

// The key of a datagram's fragments (first and later ones share it).
static __always_inline void frag_key_of(struct frag_key *k, struct pkt *p, u32 ep_id, u8 dir) {
    k->ep_id = ep_id;
    k->dir = dir;
    k->id = p->fragid;
    k->family = p->family;
    k->proto = p->l4;
    __builtin_memcpy(k->saddr, p->saddr, 16);
    __builtin_memcpy(k->daddr, p->daddr, 16);
}

static __always_inline void record_frag(struct pkt *p, u32 ep_id, u8 dir) {
    if (!p->firstfrag)
        return;
    struct frag_key k = {};
    frag_key_of(&k, p, ep_id, dir);
    u64 now = bpf_ktime_get_ns();
    frags.update(&k, &now);
}

// A packet that passes at an endpoint: its flow (with the local endpoint at its other end
// whose entry is written alongside, 0: none), and its datagram if it is a first fragment.
static __always_inline void remember(struct pkt *p, struct flow_key *fk, u32 ep_id, u8 dir, u32 peer) {
    record(p, fk, peer);
    record_frag(p, ep_id, dir);
}

// A judged drop (already counted): sample it, then drop it -- or, in audit mode, let it
// pass and remember its flow like an allowed packet's, as conntrack would.
static __always_inline int drop(struct pkt *p, struct flow_key *fk, u32 ep_id, u8 dir, u32 counter, u32 peer) {
    u32 zero = 0;
    struct config *c = config.lookup(&zero);
    u32 audit = c ? c->audit : 0;
    if (c && c->sample_interval) {
        u32 idx = ep_id * 2 + dir;
        u64 *tat = sample_tat.lookup(&idx);
        u64 now = bpf_ktime_get_ns();
        if (tat) {
            u64 t = *tat > now ? *tat : now;
            if (t - now <= c->sample_interval * c->sample_burst) {
                *tat = t + c->sample_interval;
                struct sample sm = {};
                sm.ep_id = ep_id;
                sm.counter = counter;
                sm.dir = dir;
                sm.family = p->family;
                sm.l4 = p->l4;
                sm.flags = (audit ? S_AUDIT : 0) | (p->has_port ? S_PORTS : 0);
                sm.sport = p->sport;
                sm.dport = p->dport;
                __builtin_memcpy(sm.saddr, p->saddr, 16);
                __builtin_memcpy(sm.daddr, p->daddr, 16);
                samples.push(&sm, BPF_EXIST);
            }
        }
    }
    if (!audit)
        return TC_ACT_SHOT;
    remember(p, fk, ep_id, dir, peer);
    return PASS_ON;
}

#define J_PASS 0    // passes without a judgement of its own (known flow, no endpoint state)
#define J_ACCEPT 1  // judged and passes: its flow is to be remembered
#define J_DROP 2    // judged a drop (already counted); *counter: deciding rule's or NO_COUNTER

// Judge one endpoint direction under half `half` of the double buffer: known flows and fragments, traffic
// from the node's own addresses (ingress), then the endpoint's tables. Fills `fk` with the
// flow key of the packet at this endpoint; counts the deciding rule or default deny.
// A known flow's entry: *hit = 1 (found as is) or 2 (reversed), *peer its other end's endpoint,
// *seen the time read (a TCP RST deletes the entry it found, still reported); `dev`, when not 0 (a pod
// device's tc egress, judging ingress), is stored in it.
static __always_inline int judge(struct pkt *p, struct flow_key *fk, u32 ep_id, u8 dir, u32 half, u32 len,
                                 u32 *counter, u32 dev, u32 *hit, u32 *peer, u64 *seen) {
    fk->ep_id = ep_id;
    fk->dir = dir;
    fk->family = p->family;
    fk->proto = p->tproto;
    fk->sport = p->tsport;
    fk->dport = p->tdport;
    __builtin_memcpy(fk->saddr, p->tsaddr, 16);
    __builtin_memcpy(fk->daddr, p->tdaddr, 16);

    // Known flows and their replies.
    if (p->nonfirst) {
        struct frag_key k = {};
        frag_key_of(&k, p, ep_id, dir);
        if (frags.lookup(&k))
            return J_PASS;
    } else if (!p->bad) {
        u64 now = bpf_ktime_get_ns();
        struct flow_val *v = flows.lookup(fk);
        int orig = 1;
        struct flow_key rk = {};
        if (v && !fresh(v, fk->proto, now)) {
            flows.delete(fk);
            v = 0;
        }
        if (!v) {
            rk.ep_id = ep_id;
            rk.dir = dir ^ 1;
            rk.family = p->family;
            rk.proto = p->tproto;
            rk.sport = p->tdport;
            rk.dport = p->tsport;
            __builtin_memcpy(rk.saddr, p->tdaddr, 16);
            __builtin_memcpy(rk.daddr, p->tsaddr, 16);
            v = flows.lookup(&rk);
            orig = 0;
            if (v && !fresh(v, rk.proto, now)) {
                flows.delete(&rk);
                v = 0;
            }
        }
        if (v) {
            *hit = orig ? 1 : 2;
            *peer = v->peer;
            *seen = now;
            if (!p->related) {
                if (fk->proto == P_TCP && (p->tcpflags & 0x04)) {
                    if (orig)
                        flows.delete(fk);
                    else
                        flows.delete(&rk);
                } else {
                    if (now - v->seen > T_SEEN_GRAIN)
                        v->seen = now;
                    if (fk->proto == P_TCP && (p->tcpflags & 0x01))
                        v->flags |= orig ? FL_FIN_ORIG : FL_FIN_REPLY;
                    if (dev && v->dev != dev)
                        v->dev = dev;
                }
                record_frag(p, ep_id, dir);
            }
            return J_PASS;
        }
    }

    // Traffic from the node's own addresses into an endpoint is always allowed.
    if (dir == DIR_INGRESS) {
        struct addr_key nk = {};
        nk.family = p->family;
        __builtin_memcpy(nk.addr, p->saddr, 16);
        if (nodeaddrs.lookup(&nk))
            return J_ACCEPT;
    }

    struct ep_key sk = {};
    sk.ep_id = ep_id;
    sk.half = half;
    struct ep_state *st = epstate.lookup(&sk);
    if (!st)
        return J_PASS;
    u8 flags = dir == DIR_INGRESS ? st->flags[0] : st->flags[1];
    if (!(flags & F_ENFORCED))
        return J_ACCEPT;
    u32 gen = st->gen;

    struct port_val *pv = 0;
    if (!p->bad) {
        struct peer_key pk = {};
        pk.prefixlen = 80 + (p->family == 4 ? 32 : 128);
        pk.ep_id = ep_id;
        pk.gen = gen;
        pk.dir = dir;
        pk.family = p->family;
        if (dir == DIR_EGRESS)
            __builtin_memcpy(pk.addr, p->daddr, 16);
        else
            __builtin_memcpy(pk.addr, p->saddr, 16);
        u32 lcls = 0;
        u32 *cls = 0;
        if (dir == DIR_EGRESS && (flags & F_LEARNED)) {
            // A learned destination's class: the LPM class plus the learned rules in force
            struct learn_key lk = {};
            lk.ep_id = ep_id;
            lk.gen = gen;
            lk.family = p->family;
            __builtin_memcpy(lk.addr, p->daddr, 16);
            struct learn_val *lv = learned.lookup(&lk);
            if (lv) {
                u64 now = bpf_ktime_get_ns();
#pragma unroll
                for (int i = 0; i < LEARN_STAGES; i++) {
                    if (lv->stage[i].expires > now) {
                        lcls = lv->stage[i].cls;
                        break;
                    }
                }
            }
        }
        if (lcls)
            cls = &lcls;
        else
            cls = peers.lookup(&pk);
        if (cls) {
            struct port_key qk = {};
            qk.ep_id = ep_id;
            qk.gen = gen;
            qk.cls = *cls;
            qk.dir = dir;
            // An ICMP error about no known flow is judged as the ICMP packet it is.
            qk.proto = p->proto;
            qk.has_port = p->has_port && !p->related;
            if (qk.has_port)
                __builtin_memcpy(qk.port, &p->dport, 2);  // the service port, both directions
            qk.prefixlen = 136;
            pv = ports.lookup(&qk);
        }
    }
    if (pv) {
        u32 rc = pv->counter;
        struct stat *c = rule_stats.lookup(&rc);
        if (c) {
            c->packets += 1;
            c->bytes += len;
        }
        if (pv->verdict == V_ACCEPT)
            return J_ACCEPT;
        *counter = rc;
        return J_DROP;
    }
    // A header chain we could not walk is never allowed by a rule, nor by a
    // non-isolated direction that has rules (they might have been drops).
    if ((flags & F_ISOLATED) || p->bad) {
        u32 idx = ep_id * 2 + dir;
        struct stat *c = drop_stats.lookup(&idx);
        if (c) {
            c->packets += 1;
            c->bytes += len;
        }
        *counter = NO_COUNTER;
        return J_DROP;
    }
    return J_ACCEPT;
}

// Whether the destination's hook may be spared this packet of a known flow: not a packet
// whose own processing there does more than find the flow (a fragment: its datagram is
// recorded; FIN/RST: the entry's flags change or it goes; an ICMP error; a header chain
// not walked), so sparing it changes nothing at the destination.
static __always_inline int sparable(struct pkt *p) {
    if (p->related || p->nonfirst || p->firstfrag || p->bad)
        return 0;
    return !(p->tproto == P_TCP && (p->tcpflags & 0x05));
}

// The flow key of endpoint `ep` in direction `dir` for this packet's tuple, as is or reversed.
static __always_inline void tuple_key(struct flow_key *k, struct pkt *p, u32 ep, u8 dir, int reversed) {
    k->ep_id = ep;
    k->dir = dir;
    k->family = p->family;
    k->proto = p->tproto;
    if (!reversed) {
        k->sport = p->tsport;
        k->dport = p->tdport;
        __builtin_memcpy(k->saddr, p->tsaddr, 16);
        __builtin_memcpy(k->daddr, p->tdaddr, 16);
    } else {
        k->sport = p->tdport;
        k->dport = p->tsport;
        __builtin_memcpy(k->saddr, p->tdaddr, 16);
        __builtin_memcpy(k->daddr, p->tsaddr, 16);
    }
}

// The entry the destination endpoint `peer`'s own hook would find for this packet of a flow found
// at the source (hit 1: as is -- the destination's ingress entry, same tuple; 2: a reply -- the
// destination's entry of the packet it first sent, egress, reversed).
static __always_inline void dest_key(struct flow_key *k, struct pkt *p, u32 peer, u32 hit) {
    if (hit == 1)
        tuple_key(k, p, peer, DIR_INGRESS, 0);
    else
        tuple_key(k, p, peer, DIR_EGRESS, 1);
}

// A packet of a known flow leaving endpoint `ep_id` (entry found as is: hit 1, reversed: 2)
// for the local endpoint `peer` whose entry was written with it: when that endpoint's own
// entry for the flow -- the one its hook would find -- is still there and fresh, and knows
// the device whose tc egress hook judges that endpoint, the packet is marked for that device
// only (the `config` mark bit, and the device's ifindex in tc_index); the hook there passes it without a
// lookup (see `handle`). The destination's entry is kept as its own hook would keep it (last
// seen time). A mark is thus never more than "this device's hook would pass it as a known flow".
static __always_inline void vouch(struct __sk_buff *skb, struct pkt *p, u32 peer, u32 hit, u32 bit, u64 now) {
    struct flow_key k = {};
    dest_key(&k, p, peer, hit);
    struct flow_val *v = flows.lookup(&k);
    if (!v)
        return;
    u32 dev = v->dev;
    if (!dev || dev > 0xffff || !fresh(v, k.proto, now))
        return;  // tc_index holds 16 bits: a device past them is judged as before
    if (now - v->seen > T_SEEN_GRAIN)
        v->seen = now;
    skb->mark |= bit;
    skb->tc_index = dev;
}

// Whether `deliver` / `to_pod` may hand this packet to the destination pod: everything the
// destination's hook does for it is then done here -- not for a fragment (its datagram is
// recorded there; all of a datagram's fragments take the node's path alike) or a header chain
// not walked. TCP FIN and RST, and ICMP errors about a known flow, are delivered: their change
// to the destination's entry is made here (so the node's connection tracking, which saw none
// of the flow, never judges its close or an error about it).
static __always_inline int deliverable(struct pkt *p) {
    return !(p->nonfirst || p->firstfrag || p->bad);
}

// Hands the packet straight to the pod behind `dev` (bpf_redirect_peer from the source device's
// tc ingress, into the pod's network namespace), skipping the node's forwarding, its netfilter
// and that device's hook -- when `dev` is, in the half read, a veth whose other end is in another
// namespace (`ifcfg` peer: the helper drops a packet for any other device) and the frames the
// node sends its pod are known (`devmac`). Routed as the node would route it: the TTL / hop limit
// decremented (at 1 the node's stack takes the packet, for its ICMP error), the frame addressed
// as the node addresses it. Returns TC_ACT_REDIRECT; -1: not delivered, nothing changed; or
// TC_ACT_SHOT: a packet write failed half way (never routed twice).
static __always_inline int to_pod(struct __sk_buff *skb, u32 dev, u32 half, u32 family) {
    struct if_key ik = {};
    ik.ifindex = dev;
    ik.half = half;
    struct if_cfg *dc = ifcfg.lookup(&ik);
    if (!dc || !dc->peer || dc->l3)
        return -1;
    struct l2addrs *m = devmac.lookup(&dev);
    if (!m)
        return -1;
    struct l2addrs l2 = *m;
    if (family == 4) {
        u8 ttl = 0;
        if (bpf_skb_load_bytes(skb, ETH_HLEN + 8, &ttl, 1) < 0 || ttl <= 1)
            return -1;
        u8 nttl = ttl - 1;
        if (bpf_l3_csum_replace(skb, ETH_HLEN + 10, bpf_htons((u16)ttl << 8), bpf_htons((u16)nttl << 8), 2) < 0)
            return -1;
        if (bpf_skb_store_bytes(skb, ETH_HLEN + 8, &nttl, 1, 0) < 0)
            return TC_ACT_SHOT;  // the checksum already counts the new TTL
    } else {
        u8 hl = 0;
        if (bpf_skb_load_bytes(skb, ETH_HLEN + 7, &hl, 1) < 0 || hl <= 1)
            return -1;
        hl -= 1;
        if (bpf_skb_store_bytes(skb, ETH_HLEN + 7, &hl, 1, 0) < 0)
            return -1;
    }
    if (bpf_skb_store_bytes(skb, 0, &l2, 12, 0) < 0)
        return TC_ACT_SHOT;  // TTL already decremented
    return bpf_redirect_peer(dev, 0);
}

// A packet of a known flow leaving a pod for the local endpoint `peer` (as `vouch`): when the
// destination's hook would pass it as a known flow (its entry there -- the one that hook would
// find -- fresh and knowing its device, as for the mark), it goes straight into that pod
// (`to_pod`), and the destination's entry is kept as its hook would keep it (last seen, FIN
// flags; an RST deletes it; an ICMP error changes none). Returns the tc action, or -1: not
// delivered (the caller goes on as before; nothing was changed).
static __always_inline int deliver(struct __sk_buff *skb, struct pkt *p, u32 peer, u32 hit, u32 half, u64 now) {
    struct flow_key k = {};
    dest_key(&k, p, peer, hit);
    struct flow_val *v = flows.lookup(&k);
    if (!v || !v->dev || !fresh(v, k.proto, now))
        return -1;
    int act = to_pod(skb, v->dev, half, p->family);
    if (act != TC_ACT_REDIRECT || p->related)
        return act;
    if (p->tproto == P_TCP && (p->tcpflags & 0x04)) {
        flows.delete(&k);
    } else {
        if (now - v->seen > T_SEEN_GRAIN)
            v->seen = now;
        if (p->tproto == P_TCP && (p->tcpflags & 0x01))
            v->flags |= hit == 1 ? FL_FIN_ORIG : FL_FIN_REPLY;
    }
    return act;
}

static __always_inline int handle(struct __sk_buff *skb, int hook) {
    // Vouched for by the source's hook on this node (`vouch`): only the hook of the device the
    // mark was bound to trusts it. Pods cannot set the bit: a packet crossing from the pod's
    // network namespace has its mark scrubbed. (`config` is an array: its lookup is an address
    // computation, no hashing.)
    u32 zero = 0;
    struct config *conf = config.lookup(&zero);
    u32 deliver_on = conf ? conf->deliver : 0;
    if (hook == 1) {
        u32 bit = conf ? conf->mark : 0;
        u32 m = skb->mark;
        if (m & bit) {
            u32 bound_to = skb->tc_index;
            skb->mark = m & ~bit;
            skb->tc_index = 0;
            if (bound_to == skb->ifindex)
                return PASS_ON;
        }
    }
    // The active half of the double buffer, read once, before any lookup it selects.
    u32 *ap = active.lookup(&zero);
    u32 half = ap ? (*ap & 1) : 0;
    struct if_key ik = {};
    ik.ifindex = skb->ifindex;
    ik.half = half;
    struct if_cfg *cfg = ifcfg.lookup(&ik);
    if (!cfg)
        return PASS_ON;
    u8 dir = hook == 0 ? cfg->hook_dir[0] : cfg->hook_dir[1];
    u32 bound = cfg->ep_id;
    u32 off = 0;
    if (!cfg->l3) {
        u16 eth_proto = 0;
        if (bpf_skb_load_bytes(skb, 12, &eth_proto, 2) < 0)
            return PASS_ON;
        if (eth_proto != bpf_htons(ETH_P_IP) && eth_proto != bpf_htons(ETH_P_IPV6))
            return PASS_ON;
        off = ETH_HLEN;
    }
    struct pkt p = {};
    int r = parse(skb, off, &p);
    if (r != 0)
        return PASS_ON;  // not IP (r < 0), or neighbour discovery (r > 0)

    struct addr_key ek = {};
    ek.family = p.family;
    ek.half = half;
    if (dir == DIR_EGRESS)
        __builtin_memcpy(ek.addr, p.saddr, 16);
    else
        __builtin_memcpy(ek.addr, p.daddr, 16);
    u32 ep_id;
    u32 *epp = addrs.lookup(&ek);
    if (epp) {
        ep_id = *epp;
    } else {
        ek.half = 0;  // nodeaddrs keys carry no half
        if (bound && nodeaddrs.lookup(&ek))
            // The node behind this device: arriving for it (ingress) or leaving from it
            // (egress) is its endpoint's traffic, with or without addresses in `addrs`.
            // Routed packets (neither end a node address) are not the node's.
            ep_id = bound;
        else
            return PASS_ON;  // not a local endpoint's address
    }

    u32 len = skb->len;
    struct flow_key fk = {};
    u32 counter = NO_COUNTER;
    // A pod device's tc egress judges its endpoint's ingress: the flow entries it passes
    // learn the device (what a source's mark is bound to).
    u32 dev = (hook == 1 && dir == DIR_INGRESS && !bound) ? skb->ifindex : 0;
    u32 hit = 0, hpeer = 0;
    u64 now = 0;
    int v = judge(&p, &fk, ep_id, dir, half, len, &counter, dev, &hit, &hpeer, &now);
    if (hook == 1 && deliver_on && dev && hit && cfg->peer && off) {
        // The frame as the node's stack addressed it to this device's pod (`to_pod`).
        u32 w[3] = {};  // struct l2addrs, as words (no memcmp in BPF)
        if (bpf_skb_load_bytes(skb, 0, w, 12) == 0) {
            u32 *m = (u32 *)devmac.lookup(&dev);
            if (!m || m[0] != w[0] || m[1] != w[1] || m[2] != w[2])
                devmac.update(&dev, (struct l2addrs *)w);
        }
    }
    if (v == J_DROP)
        return drop(&p, &fk, ep_id, dir, counter, 0);
    if (v == J_PASS) {
        if (hit && hpeer && dir == DIR_EGRESS) {
            // (bpf_redirect_peer works from tc ingress only: the source's hook)
            if (hook == 0 && deliver_on && off && deliverable(&p)) {
                int act = deliver(skb, &p, hpeer, hit, half, now);
                if (act >= 0)
                    return act;
            }
            u32 bit = conf ? conf->mark : 0;
            if (bit && sparable(&p))
                vouch(skb, &p, hpeer, hit, bit, now);
        }
        return PASS_ON;
    }

    // Leaving for another local endpoint (not for the node itself): that endpoint's ingress
    // is judged here too, under the same half, and the flow is remembered at both ends, each
    // entry naming the other endpoint; its own hook then passes the packet as a known flow.
    u32 paired = 0, to = 0;
    if (dir == DIR_EGRESS) {
        struct addr_key ak = {};
        ak.family = p.family;
        __builtin_memcpy(ak.addr, p.daddr, 16);
        if (!nodeaddrs.lookup(&ak)) {
            ak.half = half;
            u32 *dst = addrs.lookup(&ak);
            if (dst && *dst != ep_id) {
                u32 peer = *dst;
                struct flow_key pk = {};
                u32 pcounter = NO_COUNTER;
                u32 phit = 0, ppeer = 0;
                u64 pnow = 0;
                int pv = judge(&p, &pk, peer, DIR_INGRESS, half, len, &pcounter, 0, &phit, &ppeer, &pnow);
                if (pv == J_DROP) {
                    if (drop(&p, &pk, peer, DIR_INGRESS, pcounter, ep_id) == TC_ACT_SHOT)
                        return TC_ACT_SHOT;
                } else if (pv == J_ACCEPT) {
                    remember(&p, &pk, peer, DIR_INGRESS, ep_id);
                    to = peer;  // passed by the destination's ingress: may be delivered
                } else {
                    to = peer | TO_KNOWN;  // a flow the destination knows by this very tuple
                }
                paired = peer;
            }
        }
    }
    remember(&p, &fk, ep_id, dir, paired);
    // Direct delivery: what a judged packet teaches, and a flow's first packet (stk_deliver, a
    // program of its own: everything is decided there, from what is passed in `cb`).
    if (hook == 0 && deliver_on) {
        skb->cb[0] = to;
        skb->cb[1] = half | (off << 8) | ((u32)dir << 16);
        skb->cb[2] = ep_id;
        skb->cb[3] = bound;
        tails.call(skb, 0);  // returns only if the program is not there: the node's path
        skb->cb[0] = 0;
        skb->cb[1] = 0;
        skb->cb[2] = 0;
        skb->cb[3] = 0;
    }
    return PASS_ON;
}

int stk_ingress(struct __sk_buff *skb) { return handle(skb, 0); }

// Tail-called by a pod's tc ingress hook (with --ebpf-deliver peer) for a packet it judged and
// passed, leaving endpoint cb[2] (judged under half cb[1] & 1; its device's Ethernet header
// length cb[1] >> 8 & 0xff, direction cb[1] >> 16; bound endpoint cb[3]) -- for the local
// endpoint cb[0] when it was judged for that one's ingress too (0: none; TO_KNOWN set: that
// endpoint's entry for this very tuple was there already):
// - a pod's own veth is also the device whose tc egress hook judges the pod's ingress: the
//   entry just written learns it at once (so a reply is delivered from the first one on), and
//   the pod's frame tells how the node addresses frames to the pod (the other way round),
//   unless that hook already wrote it (`devmac`);
// - the packet goes straight into the destination's pod when the agent named its veth
//   (`epstate` dev; `to_pod`), whose entry then learns that device as its hook would have --
//   a TCP SYN, or a packet of a flow the destination knows by this tuple (see below).
// (A program of its own: verified apart from the judging before it, which leaves the
// verifier's budget too little room for this.)
int stk_deliver(struct __sk_buff *skb) {
    u32 to = skb->cb[0] & ~TO_KNOWN, known = skb->cb[0] & TO_KNOWN;
    u32 half = skb->cb[1] & 1, off = (skb->cb[1] >> 8) & 0xff, dir = (skb->cb[1] >> 16) & 0xff;
    u32 ep_id = skb->cb[2], bound = skb->cb[3];
    skb->cb[0] = 0;
    skb->cb[1] = 0;
    skb->cb[2] = 0;
    skb->cb[3] = 0;
    if (off != ETH_HLEN || dir != DIR_EGRESS || bound)
        return PASS_ON;
    u32 own = skb->ifindex;
    struct if_key ik = {};
    ik.ifindex = own;
    ik.half = half;
    struct if_cfg *cfg = ifcfg.lookup(&ik);
    if (!cfg || !cfg->peer)
        return PASS_ON;
    struct pkt p = {};
    if (parse(skb, ETH_HLEN, &p) != 0)
        return PASS_ON;
    u8 eth[12];
    if (bpf_skb_load_bytes(skb, 0, eth, 12) == 0) {
        struct l2addrs l2 = {};
        __builtin_memcpy(l2.dst, eth + 6, 6);
        __builtin_memcpy(l2.src, eth, 6);
        devmac.insert(&own, &l2);  // only where the device's own hook has not written it
    }
    struct flow_key k = {};
    tuple_key(&k, &p, ep_id, DIR_EGRESS, 0);  // the source's own entry, as `judge` wrote it
    struct flow_val *v = flows.lookup(&k);
    if (v && v->dev != own)
        v->dev = own;
    if (!to || !deliverable(&p))
        return PASS_ON;
    // Only where the node's path has nothing to add: a flow the destination knows by this very
    // tuple, or a TCP connection's SYN. Anything else judged afresh may be a reply of a flow
    // the node translated (to a Service address: the destination knows it by that address)
    // whose entries the flow table lost, which only the node's conntrack can translate back.
    if (!known && !(p.tproto == P_TCP && !p.related && (p.tcpflags & 0x12) == 0x02))
        return PASS_ON;
    struct ep_key bk = {};
    bk.ep_id = to;
    bk.half = half;
    struct ep_state *st = epstate.lookup(&bk);
    if (!st || !st->dev)
        return PASS_ON;
    u32 dev = st->dev;
    int act = to_pod(skb, dev, half, p.family);
    if (act != TC_ACT_REDIRECT)
        return act < 0 ? PASS_ON : act;
    dest_key(&k, &p, to, 1);  // its ingress entry: the packet's own tuple
    v = flows.lookup(&k);
    if (v && v->dev != dev)
        v->dev = dev;
    return act;
}

int stk_egress(struct __sk_buff *skb) { return handle(skb, 1); }
