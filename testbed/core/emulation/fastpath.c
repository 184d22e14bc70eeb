/* The link emulator's per-packet path (see forwarder.py, which drives it).
 *
 * One struct fp per forwarder: two ports (a, b) and the control socket, one
 * fp_dir per direction (0 = "up": a -> b, 1 = "down": b -> a). fp_run() moves
 * frames until the control socket is readable, then returns so that Python
 * answers the control message (by writing the fp_dir parameters) and calls it
 * again. Per packet: receive, loss / Gilbert-Elliott / blackhole decision on
 * arrival, the deadline queue (a FIFO that never lets a packet overtake
 * another without reorder, a binary heap with it), send when due (at most
 * EARLY_S early), lateness and drop counters, and the sleep (ppoll) until
 * shortly before the next deadline, busy-polling the last `spin` seconds.
 *
 * Random numbers: xoshiro256** seeded through splitmix64 from the forwarder's
 * 64-bit seed; uniform doubles in [0, 1) from the top 53 bits. The same seed
 * gives the same loss decisions for the same packet sequence.
 *
 * Built by fastpath.py with the system C compiler (cc -O2 -shared -fPIC);
 * no Python headers: it is loaded with ctypes. Keep struct fp_dir's public
 * part in step with fastpath.py's FpDir.
 */
#define _GNU_SOURCE
#include <errno.h>
#include <poll.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <sys/types.h>
#include <time.h>

#define BATCH 64          /* frames drained per socket before deadlines are looked at again */
#define EARLY_S 0.000010  /* send a packet at most this early */

enum { C_RX, C_TX, C_DROP_LOSS, C_DROP_BLACKHOLE, C_DROP_QUEUE, C_DROP_SNDBUF,
       C_DROP_ERROR, C_LATE_1MS, C_N };

struct pkt {
    struct pkt *next;  /* free list */
    uint32_t len;
    unsigned char data[];
};

struct entry {
    double deadline;
    uint64_t seq;  /* tie-break in the heap: equal deadlines leave in arrival order */
    struct pkt *pk;
};

/* Public part first: mirrored field by field by fastpath.py's FpDir. */
struct fp_dir {
    /* parameters: written by Python between fp_run() calls */
    double delay, jitter, loss;                   /* seconds, seconds, probability */
    double ge_p, ge_r, ge_bad_loss, ge_good_loss; /* Gilbert-Elliott, probabilities */
    int32_t ge_on, reorder, blackhole;
    /* state and counters: written by C, read by Python */
    int32_t ge_bad;
    uint64_t c[C_N];
    double late_sum, late_max;  /* seconds */
    uint64_t queued;
    /* private */
    double last_deadline;
    int32_t heap;  /* the queue's current shape: 1 = heap, 0 = FIFO ring */
    struct entry *q;
    size_t head, len, cap;  /* cap a power of two */
};

struct fp {
    struct fp_dir d[2];
    int fd[2], ctl;
    uint32_t bufsize;
    uint64_t rng[4];
    uint64_t seq;
    struct pkt *free;
};

/* ---- random numbers ----------------------------------------------------- */
static uint64_t splitmix64(uint64_t *x) {
    uint64_t z = (*x += 0x9e3779b97f4a7c15ULL);
    z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ULL;
    z = (z ^ (z >> 27)) * 0x94d049bb133111ebULL;
    return z ^ (z >> 31);
}

static inline uint64_t rotl(uint64_t x, int k) { return (x << k) | (x >> (64 - k)); }

static inline double rnd(struct fp *f) {
    uint64_t *s = f->rng;
    uint64_t result = rotl(s[1] * 5, 7) * 9, t = s[1] << 17;
    s[2] ^= s[0]; s[3] ^= s[1]; s[1] ^= s[2]; s[0] ^= s[3];
    s[2] ^= t; s[3] = rotl(s[3], 45);
    return (double)(result >> 11) * 0x1.0p-53;
}

static inline double mono(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (double)ts.tv_sec + ts.tv_nsec * 1e-9;
}

/* ---- packet buffers ----------------------------------------------------- */
static struct pkt *buf_get(struct fp *f) {
    struct pkt *p = f->free;
    if (p) {
        f->free = p->next;
        return p;
    }
    return malloc(sizeof(struct pkt) + f->bufsize);
}

static inline void buf_put(struct fp *f, struct pkt *p) {
    p->next = f->free;
    f->free = p;
}

/* ---- the deadline queue: FIFO ring or binary heap ------------------------ */
static inline int before(const struct entry *x, const struct entry *y) {
    return x->deadline < y->deadline || (x->deadline == y->deadline && x->seq < y->seq);
}

static int cmp_entry(const void *x, const void *y) {
    return before(x, y) ? -1 : before(y, x) ? 1 : 0;
}

/* Make the queue one contiguous array from index 0 (order kept), with room for one more. */
static int q_linearize(struct fp_dir *d, size_t cap) {
    struct entry *n = malloc(cap * sizeof *n);
    if (!n)
        return -ENOMEM;
    for (size_t i = 0; i < d->len; i++)
        n[i] = d->q[(d->head + i) & (d->cap - 1)];
    free(d->q);
    d->q = n;
    d->head = 0;
    d->cap = cap;
    return 0;
}

static int q_push(struct fp_dir *d, struct entry e) {
    if (d->len == d->cap) {
        int r = q_linearize(d, d->cap * 2);
        if (r)
            return r;
    }
    if (!d->heap) {
        d->q[(d->head + d->len++) & (d->cap - 1)] = e;
        return 0;
    }
    size_t i = d->len++;  /* sift up */
    while (i > 0) {
        size_t parent = (i - 1) / 2;
        if (!before(&e, &d->q[parent]))
            break;
        d->q[i] = d->q[parent];
        i = parent;
    }
    d->q[i] = e;
    return 0;
}

static inline struct entry *q_top(struct fp_dir *d) {
    return d->len ? &d->q[d->head] : NULL;
}

/* Put e at heap index i (a hole) or below it, moving smaller children up. */
static void sift_down(struct fp_dir *d, size_t i, struct entry e) {
    for (;;) {
        size_t child = 2 * i + 1;
        if (child >= d->len)
            break;
        if (child + 1 < d->len && before(&d->q[child + 1], &d->q[child]))
            child++;
        if (!before(&d->q[child], &e))
            break;
        d->q[i] = d->q[child];
        i = child;
    }
    d->q[i] = e;
}

static struct entry q_pop(struct fp_dir *d) {
    struct entry top = d->q[d->head];
    if (!d->heap) {
        d->head = (d->head + 1) & (d->cap - 1);
        d->len--;
        return top;
    }
    struct entry last = d->q[--d->len];
    if (d->len)
        sift_down(d, 0, last);
    return top;
}

/* Restore the heap property over the whole (linearized) array, bottom-up. */
static void q_heapify(struct fp_dir *d) {
    for (size_t k = d->len / 2; k-- > 0;)
        sift_down(d, k, d->q[k]);
}

/* Bring the queue's shape in line with the reorder parameter. Entering heap
 * mode heapifies (whatever the FIFO holds is not assumed ordered); leaving it
 * sorts the queue and moves last_deadline up to its last deadline, since
 * heap mode does not advance it and FIFO packets must not be given a deadline
 * before those of the packets they queue behind. */
static int q_apply_shape(struct fp_dir *d) {
    int want = d->reorder ? 1 : 0;
    if (want == d->heap)
        return 0;
    int r = q_linearize(d, d->cap);
    if (r)
        return r;
    if (want) {
        q_heapify(d);
    } else {
        qsort(d->q, d->len, sizeof *d->q, cmp_entry);
        if (d->len && d->q[d->len - 1].deadline > d->last_deadline)
            d->last_deadline = d->q[d->len - 1].deadline;
    }
    d->heap = want;
    return 0;
}

/* ---- receive: loss decisions and deadlines ------------------------------- */
static int ingest(struct fp *f, int i) {
    struct fp_dir *d = &f->d[i];
    int fd = f->fd[i], n = 0, err = 0;
    double now = mono(), last = d->last_deadline;
    while (n < BATCH) {
        struct pkt *pk = buf_get(f);
        if (!pk) {
            err = -ENOMEM;
            break;
        }
        ssize_t len = recv(fd, pk->data, f->bufsize, MSG_DONTWAIT);
        if (len < 0) {
            buf_put(f, pk);
            if (errno == EINTR)
                continue;
            if (errno != EAGAIN && errno != EWOULDBLOCK)
                err = -errno;
            break;
        }
        n++;
        pk->len = (uint32_t)len;
        if (d->blackhole) {
            d->c[C_DROP_BLACKHOLE]++;
            buf_put(f, pk);
            continue;
        }
        int lost;
        if (d->ge_on) {
            if (d->ge_bad) {
                if (rnd(f) < d->ge_r)
                    d->ge_bad = 0;
            } else if (rnd(f) < d->ge_p) {
                d->ge_bad = 1;
            }
            lost = rnd(f) < (d->ge_bad ? d->ge_bad_loss : d->ge_good_loss);
        } else {
            lost = d->loss > 0 && rnd(f) < d->loss;
        }
        if (lost) {
            d->c[C_DROP_LOSS]++;
            buf_put(f, pk);
            continue;
        }
        double deadline = now + d->delay;
        struct entry e = {0, f->seq++, pk};
        if (d->jitter > 0) {
            deadline += (2 * rnd(f) - 1) * d->jitter;
            if (deadline < now)
                deadline = now;
            if (d->heap) {
                e.deadline = deadline;
                if ((err = q_push(d, e))) {
                    buf_put(f, pk);
                    break;
                }
                continue;
            }
        }
        if (deadline < last)  /* never overtake: no reordering */
            deadline = last;
        last = deadline;
        e.deadline = deadline;
        if ((err = q_push(d, e))) {
            buf_put(f, pk);
            break;
        }
    }
    d->last_deadline = last;
    d->queued = d->len;
    /* release: whoever reads rx from another thread (the tests) sees queued too */
    __atomic_store_n(&d->c[C_RX], d->c[C_RX] + n, __ATOMIC_RELEASE);
    return err;
}

/* ---- transmit: everything due --------------------------------------------- */
static void flush(struct fp *f, struct fp_dir *d, int fd, double now) {
    double limit = now + EARLY_S;
    struct entry *top;
    while ((top = q_top(d)) && top->deadline <= limit) {
        struct entry e = q_pop(d);
        double late = now - e.deadline;
        if (late > 0) {
            d->late_sum += late;
            if (late > d->late_max)
                d->late_max = late;
            if (late > 0.001)
                d->c[C_LATE_1MS]++;
        }
        ssize_t r;
        do
            r = send(fd, e.pk->data, e.pk->len, MSG_DONTWAIT);
        while (r < 0 && errno == EINTR);
        if (r >= 0)
            d->c[C_TX]++;
        else if (errno == EAGAIN || errno == EWOULDBLOCK)
            d->c[C_DROP_SNDBUF]++;
        else if (errno == ENOBUFS)  /* the egress pfifo is full */
            d->c[C_DROP_QUEUE]++;
        else
            d->c[C_DROP_ERROR]++;
        buf_put(f, e.pk);
    }
}

/* ---- the API ------------------------------------------------------------- */
struct fp *fp_open(int fd_a, int fd_b, int ctl, uint32_t bufsize, uint64_t seed) {
    struct fp *f = calloc(1, sizeof *f);
    if (!f)
        return NULL;
    f->fd[0] = fd_a;
    f->fd[1] = fd_b;
    f->ctl = ctl;
    f->bufsize = bufsize;
    for (int i = 0; i < 4; i++)
        f->rng[i] = splitmix64(&seed);
    for (int i = 0; i < 2; i++) {
        f->d[i].cap = 256;
        f->d[i].q = malloc(f->d[i].cap * sizeof(struct entry));
        if (!f->d[i].q) {
            free(f->d[0].q);
            free(f);
            return NULL;
        }
    }
    return f;
}

struct fp_dir *fp_dir(struct fp *f, int i) { return &f->d[i & 1]; }

/* Forward until the control socket is readable (returns 0), a signal
 * interrupts the wait (returns 1) or a socket fails (returns -errno). */
int fp_run(struct fp *f, double spin) {
    int r = 0;
    for (int i = 0; i < 2 && !r; i++)
        r = q_apply_shape(&f->d[i]);
    struct pollfd p[3] = {{f->fd[0], POLLIN, 0}, {f->fd[1], POLLIN, 0}, {f->ctl, POLLIN, 0}};
    while (!r) {
        double now = mono();
        flush(f, &f->d[0], f->fd[1], now);
        flush(f, &f->d[1], f->fd[0], now);
        f->d[0].queued = f->d[0].len;  /* kept current: read while the loop runs */
        f->d[1].queued = f->d[1].len;
        struct entry *tu = q_top(&f->d[0]), *td = q_top(&f->d[1]);
        struct timespec ts, *tsp = NULL;
        if (tu || td) {
            double nxt = tu && (!td || tu->deadline <= td->deadline) ? tu->deadline : td->deadline;
            double wait = nxt - mono();
            wait = wait > spin ? wait - spin : 0;
            ts.tv_sec = (time_t)wait;
            ts.tv_nsec = (long)((wait - (double)ts.tv_sec) * 1e9);
            tsp = &ts;
        }
        int n = ppoll(p, 3, tsp, NULL);
        if (n < 0) {
            if (errno == EINTR) {
                r = 1;
                break;
            }
            r = -errno;
            break;
        }
        if (n == 0)
            continue;
        for (int i = 0; i < 2 && !r; i++) {
            if (p[i].revents & POLLNVAL)
                r = -EBADF;
            else if (p[i].revents)
                r = ingest(f, i);  /* an error condition surfaces as recv's errno */
        }
        if (!r && p[2].revents)
            break;  /* a control message (or the parent closed the channel) */
    }
    for (int i = 0; i < 2; i++)
        f->d[i].queued = f->d[i].len;
    return r;
}

void fp_close(struct fp *f) {
    if (!f)
        return;
    for (int i = 0; i < 2; i++) {
        struct fp_dir *d = &f->d[i];
        for (size_t k = 0; k < d->len; k++)
            free(d->q[(d->head + k) & (d->cap - 1)].pk);
        free(d->q);
    }
    while (f->free) {
        struct pkt *p = f->free;
        f->free = p->next;
        free(p);
    }
    free(f);
}
