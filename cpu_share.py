"""How many CPU threads llama.cpp should use right now, given what other processes use.

Contract: `CpuShare.threads()` answers, for generation and for prompt evaluation, a thread count
between 1 and the configured limit: the limit while the machine's other processes leave the cores
free, fewer while they use them. A daemon thread reads Linux's /proc/stat and this process's own CPU
time every SAMPLE_SECONDS; where /proc/stat is missing it always answers the limit. `recheck()`, called
as a request starts, gives the cores back at once when the load the last reading saw has already
ended (no thread of another process is runnable now), and has the next reading taken MIN_WINDOW later. It never touches the model: the engine applies
the answer (llama_set_n_threads) before each llama_decode.

Why: llama.cpp's OpenMP threads wait for each other at every operation, spinning. Alone, spinning is
the fastest way to wait (passive waiting made decoding 4x slower here). When another process holds a
core, a spinning thread burns the time slice the thread it waits for needs, and decoding collapses to
a few percent of its speed (README, "Sharing the machine"). A thread that waits for no one cannot
collapse: so with other work on the cores, llama.cpp gets as many threads as there are free cores.
"""

import os
import threading
import time

# Seconds between two readings of the machine's load: short enough to follow a build starting in the
# middle of an answer, long enough that the reading is not noise.
SAMPLE_SECONDS = 0.5
# The shortest window a reading is taken over (/proc/stat counts in 10 ms ticks).
MIN_WINDOW = 0.1
# Cores' worth of CPU other processes must use before a core counts as taken (an editor's or a
# browser's background work should not halve the speed).
TAKEN_CORE = 0.5
# An instant's count of runnable threads also catches the client that just sent the request, and the
# kernel's own threads passing the packets: only a thread seen in every one of a few readings over
# a couple of milliseconds counts as load that goes on.
RECHECK_READINGS = 4
RECHECK_GAP = 0.0005


def free_threads(limit, cores, others):
    """Threads for llama.cpp when other processes use `others` cores' worth of CPU.

    >>> free_threads(2, 2, 0.1), free_threads(2, 2, 0.9), free_threads(2, 2, 3.0), free_threads(8, 8, 1.2)
    (2, 1, 1, 7)
    """
    taken = int(others + (1 - TAKEN_CORE))  # others rounded, a core counting from TAKEN_CORE of it
    return max(1, min(limit, cores - taken))


def _read_busy_seconds():
    """CPU seconds the whole machine has been busy (steal included: a hypervisor's other guests
    take cores too), or None without /proc/stat."""
    try:
        with open("/proc/stat") as f:
            fields = [int(v) for v in f.readline().split()[1:]]
    except (OSError, ValueError):
        return None
    idle = fields[3] + (fields[4] if len(fields) > 4 else 0)  # idle + iowait
    return (sum(fields[:8]) - idle) / os.sysconf("SC_CLK_TCK")


def _runnable_elsewhere():
    """Threads of other processes runnable at this instant (the kernel's count of runnable threads,
    less this process's own, counted before and after it: they come and go meanwhile), or None
    without /proc."""
    try:
        own = _own_runnable()
        with open("/proc/loadavg") as f:
            runnable = int(f.read().split()[3].split("/")[0])
        own = max(own, _own_runnable())
    except (OSError, ValueError, IndexError):
        return None
    return max(0, runnable - own)


def _own_runnable():
    count = 0
    for task in os.listdir("/proc/self/task"):
        try:
            with open(f"/proc/self/task/{task}/stat") as f:
                count += f.read().rsplit(")", 1)[1].split()[0] == "R"
        except FileNotFoundError:  # a thread that ended meanwhile
            pass
    return count


_clock = time.monotonic


def _own_seconds():
    times = os.times()
    return times.user + times.system


class CpuShare:
    """The thread counts to use now. `adaptive` says, for generation and for prompt evaluation,
    whether its limit may be lowered; a count the operator fixed (--threads) is kept as given.

    A daemon thread takes a reading every SAMPLE_SECONDS, so the first request after an idle hour
    sees the last half second, not the hour's average."""

    def __init__(self, limit_generate, limit_batch, adaptive=(True, True)):
        self.limits = (limit_generate, limit_batch)
        self.adaptive = adaptive
        self._cores = usable_cores()
        self._others = 0.0
        self._last = self._reading() if any(adaptive) else None
        self._stopped = threading.Event()
        self._soon = threading.Event()  # a recheck gave cores back: confirm it after MIN_WINDOW
        if self._last is not None:
            threading.Thread(target=self._sample_forever, daemon=True).start()

    def _reading(self):
        busy = _read_busy_seconds()
        return None if busy is None else (_clock(), busy, _own_seconds())

    def sample(self):
        """Cores' worth of CPU other processes used since the last reading; a new reading."""
        now = self._reading()
        if now is None or self._last is None:
            return self._others
        wall, busy, own = (b - a for a, b in zip(self._last, now))
        if wall < MIN_WINDOW:
            return self._others  # busy time comes in clock ticks: over a shorter window it is noise
        self._others = max(0.0, (busy - own) / wall)
        self._last = now
        return self._others

    def _sample_forever(self):
        while not self._stopped.is_set():
            if self._soon.wait(SAMPLE_SECONDS):
                self._soon.clear()
                time.sleep(MIN_WINDOW)
            if not self._stopped.is_set():
                self.sample()

    def recheck(self):
        """A request starts: a burst of other work that ended within the last reading (a client
        building its request, another process's answer) must not slow it down until the next one.
        Only ever gives cores back; load that goes on is seen at the next reading."""
        if self._last is None or self._others < TAKEN_CORE:
            return
        now = None
        for _ in range(RECHECK_READINGS):
            now = _runnable_elsewhere()
            if now is None or now == 0:
                break
            time.sleep(RECHECK_GAP)
        if now is not None and now < self._others:
            # the next reading measures from here, without the load that has ended, and comes soon:
            # a load only pausing (another server between two requests) must not get the cores long
            self._others, self._last = float(now), self._reading()
            self._soon.set()

    def stop(self):
        self._stopped.set()
        self._soon.set()

    def threads(self):
        """(threads while generating, threads while evaluating a prompt)."""
        if self._last is None:
            return self.limits
        return tuple(free_threads(limit, self._cores, self._others) if adapt else limit
                     for limit, adapt in zip(self.limits, self.adaptive))


def usable_cores():
    """The cores this process may run on (a container or taskset may allow fewer than the host has)."""
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        return os.cpu_count() or 1
