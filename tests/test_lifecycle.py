"""Policy table tests: the lifecycle state machine with an injected clock (no fork, no sleep).

Each test drives pyfork.primary.lifecycle.Lifecycle with events the arbiter would feed and checks the
actions it returns: backoff sequence, reset after stable uptime, giving up on boot failures
only (a READY worker that dies is always respawned), the give-up cool-down, exit 3, the
cause named in the log, hung worker kill, recycling order, rolling restart success and
abort, graceful stop.
"""
import random
import signal

import pytest

from pyfork.primary import lifecycle as P


def kinds(actions, cls):
    return [a for a in actions if isinstance(a, cls)]


def messages(actions):
    return [a.message for a in actions if isinstance(a, P.Log)]


def boot(n=2, **kw):
    """A lifecycle with n workers forked and READY at t=1000."""
    lc = P.Lifecycle(**kw)
    acts = lc.handle(P.Start(n), 1000.0)
    spawns = kinds(acts, P.Spawn)
    assert [s.slot for s in spawns] == list(range(n))
    for s in spawns:
        lc.handle(P.Forked(s.wid, 10000 + s.wid), 1000.0)
        acts = lc.handle(P.Ready(s.wid), 1000.1)
        assert kinds(acts, P.Activate) == [P.Activate(s.wid)]
    return lc, [s.wid for s in spawns]


def test_transitions_are_data_and_bad_moves_raise():
    assert P.WORKER_MOVES[(P.SPAWNING, "ready")] == P.READY
    assert (P.EXITED, "ready") not in P.WORKER_MOVES
    with pytest.raises(P.LifecycleError):
        P.move(P.WORKER_MOVES, P.EXITED, "ready", "worker 1")
    # only "give_up" leads to GAVE_UP, and a READY worker's death ("stable_exit", "rapid_exit") never
    # does; GAVE_UP is left by the cool-down or a HUP
    assert {what for (_, what), to in P.SLOT_MOVES.items() if to == P.GAVE_UP} == {"give_up"}
    assert P.SLOT_MOVES[(P.RUNNING, "rapid_exit")] == P.BACKOFF
    assert P.SLOT_MOVES[(P.GAVE_UP, "cooled_down")] == P.RUNNING
    with pytest.raises(P.LifecycleError):
        P.move(P.SLOT_MOVES, P.GAVE_UP, "rapid_exit", "slot 0")


def test_backoff_formula():
    assert [P.backoff_delay(k) for k in range(0, 9)] == [0.0, 0.2, 0.4, 0.8, 1.6, 3.2, 6.4, 10.0, 10.0]
    assert P.backoff_delay(1000) == 10.0


def boot_fail_slot(lc, slot_index, now):
    """Makes slot ``slot_index`` fail at boot until it gives up; returns the time it did."""
    slot = lc.slots[slot_index]
    w = lc.workers[slot.worker]
    if w.state == P.READY:                                 # a READY worker's death never gives up:
        now += 5.0                                         # let it die stable, respawn at once
        sp = kinds(lc.handle(P.Exited(w.wid, signal=signal.SIGKILL), now), P.Spawn)
        assert [s.slot for s in sp] == [slot_index]
    while slot.state != P.GAVE_UP:
        if slot.state == P.BACKOFF:
            now = slot.due
            lc.handle(P.Tick(), now)
        now += 0.05
        lc.handle(P.Exited(slot.worker, code=4), now)      # the app fails to import
    return now


def test_boot_failures_back_off_then_give_up_and_exit_3():
    lc = P.Lifecycle(min_uptime=1.0, max_restarts=5)
    now = 0.0
    wid = kinds(lc.handle(P.Start(1), now), P.Spawn)[0].wid
    delays = []
    forks = 1
    while True:
        lc.handle(P.Forked(wid, 100 + wid), now)
        now += 0.05
        acts = lc.handle(P.Exited(wid, code=4), now)   # boot failure: exit before READY
        if kinds(acts, P.Exit) or lc.slots[0].state == P.GAVE_UP:
            break
        assert not kinds(acts, P.Spawn)                  # never respawned at once
        slot = lc.slots[0]
        assert slot.state == P.BACKOFF
        delays.append(round(slot.due - now, 3))
        # nothing happens before the delay is over
        assert not kinds(lc.handle(P.Tick(), slot.due - 0.001), P.Spawn)
        now = slot.due
        acts = lc.handle(P.Tick(), now)
        spawns = kinds(acts, P.Spawn)
        assert len(spawns) == 1
        wid = spawns[0].wid
        forks += 1
    assert delays == [0.2, 0.4, 0.8, 1.6]
    assert forks == 5                                     # bounded: max_restarts forks per slot
    assert lc.slots[0].state == P.GAVE_UP
    assert kinds(acts, P.Exit) == [P.Exit(3)]
    assert any("GIVES UP after 5 boot failures in a row" in m for m in messages(acts))
    assert any("exit code 4 (the app, its post_fork hook or its interface failed to load" in m
               for m in messages(acts))


def test_log_line_format():
    lc, (w1, w2) = boot(2)
    acts = lc.handle(P.Exited(w1, code=1, signal=None), 1000.3)
    assert messages(acts) == [
        f"worker {w1} (pid {10000 + w1}) exited code=1 signal=None after 0.3 s: exit code 1 (an uncaught "
        "error or sys.exit(1); a traceback, if any, is in the log above); up less than min_uptime 1.0 s "
        "(#1 in a row): respawning in 200 ms"]
    acts = lc.handle(P.Exited(w2, signal=signal.SIGKILL), 1010.0)
    assert messages(acts) == [
        f"worker {w2} (pid {10000 + w2}) exited code=None signal=9 after 10.0 s: killed by SIGKILL "
        "(the OOM killer or an operator?); respawning now"]


@pytest.mark.parametrize("code,sig,killed,words", [
    (None, signal.SIGKILL, False, "killed by SIGKILL (the OOM killer or an operator?)"),
    (None, signal.SIGKILL, True, "killed by SIGKILL (sent by pyfork, reason above)"),
    (None, signal.SIGSEGV, False, "killed by SIGSEGV (a crash in native code"),
    (None, signal.SIGABRT, False, "killed by SIGABRT (abort()"),
    (None, signal.SIGUSR1, False, "killed by SIGUSR1 (a signal it does not handle)"),
    (None, 77, False, "killed by signal 77 (a signal it does not handle)"),
    (4, None, False, "exit code 4 (the app, its post_fork hook or its interface failed to load"),
    (0, None, False, "exit code 0 (it stopped by itself)"),
    (17, None, False, "exit code 17"),
    (None, None, False, "never started"),
])
def test_exit_cause_in_words(code, sig, killed, words):
    assert P.describe_exit(code, sig, killed_by_pyfork=killed).startswith(words)


def test_cause_says_pyfork_killed_a_hung_worker():
    lc, (w1, w2) = boot(2, timeout=5.0)
    assert kinds(lc.handle(P.Tick({w1: 1000.0, w2: 1009.0}), 1010.0), P.Kill) == [P.Kill(w1, signal.SIGABRT)]
    assert kinds(lc.handle(P.Tick({w2: 1011.0}), 1010.0 + P.ABORT_GRACE), P.Kill) == [P.Kill(w1, signal.SIGKILL)]
    acts = lc.handle(P.Exited(w1, signal=signal.SIGKILL), 1012.1)
    assert "killed by SIGKILL (sent by pyfork, reason above)" in messages(acts)[0]


def test_stable_uptime_resets_crash_count():
    lc, (w1, _) = boot(2, min_uptime=1.0)
    now = 1000.5
    acts = lc.handle(P.Exited(w1, code=1), now)           # rapid: within min_uptime
    assert lc.slots[0].crashes == 1
    now = lc.slots[0].due
    w3 = kinds(lc.handle(P.Tick(), now), P.Spawn)[0].wid
    lc.handle(P.Forked(w3, 3), now)
    lc.handle(P.Ready(w3), now + 0.1)
    now += 60                                              # stable for a minute
    acts = lc.handle(P.Exited(w3, code=None, signal=9), now)
    spawns = kinds(acts, P.Spawn)
    assert len(spawns) == 1                                # respawned at once
    assert lc.slots[0].crashes == 0
    assert "respawning now" in messages(acts)[0]


def test_one_slot_giving_up_does_not_exit_while_others_serve():
    lc, (w1, w2) = boot(2, max_restarts=1)
    boot_fail_slot(lc, 0, 1000.2)
    assert lc.slots[0].state == P.GAVE_UP
    assert not lc.stopping and not lc.exited
    assert lc.slots[1].worker == w2


def test_all_slots_giving_up_exits_3_after_the_rest_are_gone():
    lc, (w1, w2) = boot(2, max_restarts=1)
    now = boot_fail_slot(lc, 0, 1000.2)
    assert not lc.stopping
    boot_fail_slot(lc, 1, now)
    assert lc.stopping and lc.exited and lc.exit_code == 3


def test_ready_worker_killed_over_and_over_is_always_respawned():
    # the OOM killer or an operator kills every new worker soon after READY: backoff, never a give-up
    lc, (w1, w2) = boot(2, max_restarts=5, min_uptime=1.0)
    slot = lc.slots[0]
    now, wid, delays = 1000.5, w1, []
    for _ in range(20):
        acts = lc.handle(P.Exited(wid, signal=signal.SIGKILL), now)
        assert slot.state == P.BACKOFF and not kinds(acts, P.Exit) and not kinds(acts, P.ReleaseSlot)
        delays.append(round(slot.due - now, 3))
        assert not kinds(lc.handle(P.Tick(), slot.due - 0.001), P.Spawn)
        now = slot.due
        wid = kinds(lc.handle(P.Tick(), now), P.Spawn)[0].wid
        _ready(lc, wid, now + 0.05)
        now += 0.5                                         # killed 0.5 s after its fork
    assert delays[:7] == [0.2, 0.4, 0.8, 1.6, 3.2, 6.4, 10.0]
    assert set(delays[7:]) == {10.0}                       # capped: at most one fork per 10 s
    assert slot.boot_failures == 0 and slot.restarts == 20
    assert not lc.stopping
    # a worker that then lives past min_uptime resets k: the next death respawns at once
    acts = lc.handle(P.Exited(wid, signal=signal.SIGKILL), now + 60)
    assert [s.slot for s in kinds(acts, P.Spawn)] == [0] and slot.crashes == 0


def test_any_exit_code_or_signal_after_ready_never_gives_up():
    for code, sig in [(0, None), (1, None), (4, None), (None, signal.SIGSEGV), (None, signal.SIGTERM)]:
        lc, (w1, w2) = boot(2, max_restarts=1)
        acts = lc.handle(P.Exited(w1, code=code, signal=sig), 1000.2)
        assert lc.slots[0].state == P.BACKOFF, (code, sig)
        assert lc.slots[0].boot_failures == 0 and not kinds(acts, P.ReleaseSlot)


def test_kill_storm_on_two_ready_slots_leaves_both_serving():
    # issue 11: 16 SIGKILLs in 10 s, each at a random READY worker; workers boot in 50 ms
    rng = random.Random(11)
    lc, _ = boot(2, max_restarts=5, min_uptime=1.0)
    now = 1005.0
    booting = {}                                           # wid -> when it says READY

    def advance(until):
        nonlocal now
        while True:
            times = [t for t in booting.values() if t <= until]
            dl = lc.next_deadline(now)
            if dl is not None and dl <= until:
                times.append(dl)
            if not times:
                break
            now = max(now, min(times))
            for wid in [w for w, t in booting.items() if t <= now]:
                del booting[wid]
                lc.handle(P.Ready(wid), now)
            for sp in kinds(lc.handle(P.Tick(), now), P.Spawn):
                lc.handle(P.Forked(sp.wid, 30000 + sp.wid), now)
                booting[sp.wid] = now + 0.05
        now = until

    kills = 0
    for i in range(16):
        advance(max(now, 1005.0 + 0.5 * i))
        ready = [w.wid for w in lc.workers.values() if w.state == P.READY]
        give_up_at = now + 30.0
        while not ready and now < give_up_at:              # both backing off: kill the first one up
            advance(now + 0.01)
            ready = [w.wid for w in lc.workers.values() if w.state == P.READY]
        assert ready, "no READY worker for 30 s"
        kills += 1
        for sp in kinds(lc.handle(P.Exited(rng.choice(ready), signal=signal.SIGKILL), now), P.Spawn):
            lc.handle(P.Forked(sp.wid, 30000 + sp.wid), now)
            booting[sp.wid] = now + 0.05
    advance(now + 60)
    assert kills == 16
    assert [s.state for s in lc.slots.values()] == [P.RUNNING, P.RUNNING]
    assert lc.serving() == 2 and not lc.stopping
    assert sum(s.restarts for s in lc.slots.values()) == kills


def test_boot_failure_count_resets_when_a_worker_gets_ready():
    lc, (w1, w2) = boot(2, max_restarts=3)
    now = 1010.0
    slot = lc.slots[0]
    wid = kinds(lc.handle(P.Exited(w1, signal=signal.SIGKILL), now), P.Spawn)[0].wid
    for _ in range(3):
        for _ in range(2):                                 # two boot failures: one short of giving up
            now += 0.05
            lc.handle(P.Exited(wid, code=4), now)
            assert slot.state == P.BACKOFF
            now = slot.due
            wid = kinds(lc.handle(P.Tick(), now), P.Spawn)[0].wid
        assert slot.boot_failures == 2
        _ready(lc, wid, now + 0.1)                         # it booted: the count starts over
        assert slot.boot_failures == 0
        now += 0.3
        lc.handle(P.Exited(slot.worker, signal=signal.SIGKILL), now)
        now = slot.due
        wid = kinds(lc.handle(P.Tick(), now), P.Spawn)[0].wid
    assert slot.state == P.RUNNING and not lc.stopping


def test_given_up_slot_retries_after_the_cooldown_while_another_serves():
    lc, (w1, w2) = boot(2, max_restarts=2, give_up_cooldown=60.0)
    now = boot_fail_slot(lc, 0, 1000.2)
    slot = lc.slots[0]
    assert slot.state == P.GAVE_UP and slot.retry_at == pytest.approx(now + 60.0)
    assert lc.next_deadline(now) == pytest.approx(now + 60.0)
    assert not kinds(lc.handle(P.Tick(), now + 59.9), P.Spawn)
    acts = lc.handle(P.Tick(), now + 60.0)
    assert [s.slot for s in kinds(acts, P.Spawn)] == [0]
    assert slot.state == P.RUNNING and slot.boot_failures == 0 and slot.crashes == 0
    assert any("trying it again" in m for m in messages(acts))
    # still broken: it gives up again after max_restarts more boot failures, and waits again
    now = boot_fail_slot(lc, 0, now + 60.0)
    assert slot.state == P.GAVE_UP and slot.retry_at == pytest.approx(now + 60.0)
    assert not lc.stopping
    # fixed now: the next retry serves
    wid = kinds(lc.handle(P.Tick(), now + 60.0), P.Spawn)[0].wid
    _ready(lc, wid, now + 60.5)
    assert lc.serving() == 2


def test_cooldown_waits_for_another_slot_to_serve():
    lc, (w1, w2) = boot(2, max_restarts=1, give_up_cooldown=5.0)
    now = boot_fail_slot(lc, 0, 1000.2)
    # slot 1's worker dies too and its respawn is still booting when the cool-down ends
    now += 2.0
    w3 = kinds(lc.handle(P.Exited(w2, signal=signal.SIGKILL), now), P.Spawn)[0].wid
    lc.handle(P.Forked(w3, 333), now)
    now += 10.0
    assert lc.next_deadline(now) is None or lc.next_deadline(now) > now   # no busy loop meanwhile
    assert not kinds(lc.handle(P.Tick(), now), P.Spawn)
    acts = lc.handle(P.Ready(w3), now + 0.1)               # someone serves: the retry starts
    assert [s.slot for s in kinds(acts, P.Spawn)] == [0]


def test_slots_failing_everywhere_never_take_turns_they_exit_3():
    # a short cool-down must not keep a broken app alive by reviving one slot while another gives up
    lc = P.Lifecycle(max_restarts=2, give_up_cooldown=0.5)
    spawns = kinds(lc.handle(P.Start(2), 0.0), P.Spawn)
    now = 0.0
    booting = {sp.wid for sp in spawns}
    for step in range(2000):
        if lc.exited:
            break
        now += 0.1
        for wid in list(booting):
            if wid in lc.workers and lc.workers[wid].started <= now - 0.1 * (1 + wid % 3):
                booting.discard(wid)
                lc.handle(P.Exited(wid, code=4), now)
        booting |= {sp.wid for sp in kinds(lc.handle(P.Tick(), now), P.Spawn)}
    assert lc.exited and lc.exit_code == 3


def test_cooldown_zero_never_retries():
    lc, (w1, w2) = boot(2, max_restarts=1, give_up_cooldown=0)
    now = boot_fail_slot(lc, 0, 1000.2)
    assert lc.slots[0].retry_at is None and lc.next_deadline(now) is None
    assert not kinds(lc.handle(P.Tick(), now + 1e6), P.Spawn)
    assert lc.slots[0].state == P.GAVE_UP


def test_hung_worker_is_killed_and_replaced():
    lc, (w1, w2) = boot(2, timeout=5.0)
    now = 1003.0
    assert not kinds(lc.handle(P.Tick({w1: 1002.0, w2: 1002.5}), now), P.Kill)
    now = 1008.0
    acts = lc.handle(P.Tick({w1: 1002.0, w2: 1007.5}), now)
    # first SIGABRT (it logs its tracebacks), SIGKILL once ABORT_GRACE has passed
    assert kinds(acts, P.Kill) == [P.Kill(w1, signal.SIGABRT)]
    assert "hung" in messages(acts)[0]
    assert lc.next_deadline(now) == now + P.ABORT_GRACE
    assert not kinds(lc.handle(P.Tick({w1: 1002.0, w2: 1008.0}), now + P.ABORT_GRACE / 2), P.Kill)
    assert kinds(lc.handle(P.Tick({w2: 1009.0}), now + P.ABORT_GRACE), P.Kill) == [P.Kill(w1, signal.SIGKILL)]
    # not killed twice
    assert not kinds(lc.handle(P.Tick({w1: 1002.0, w2: 1010.0}), now + P.ABORT_GRACE + 1), P.Kill)
    acts = lc.handle(P.Exited(w1, signal=signal.SIGKILL), now + P.ABORT_GRACE + 1.1)
    assert len(kinds(acts, P.Spawn)) == 1                  # stable before: respawn now


def test_timeout_zero_disables_hung_detection():
    lc, (w1,) = boot(1, timeout=0)
    assert not kinds(lc.handle(P.Tick({w1: 0.0}), 99999.0), P.Kill)


def test_worker_never_ready_is_killed_after_ready_timeout_a_boot_failure():
    lc = P.Lifecycle(ready_timeout=10.0)
    wid = kinds(lc.handle(P.Start(1), 0.0), P.Spawn)[0].wid
    assert not kinds(lc.handle(P.Tick(), 9.0), P.Kill)
    assert kinds(lc.handle(P.Tick(), 10.0), P.Kill) == [P.Kill(wid, signal.SIGKILL)]
    lc.handle(P.Exited(wid, signal=9), 10.1)
    assert lc.slots[0].state == P.BACKOFF                  # never READY = boot failure
    assert lc.slots[0].boot_failures == 1


def test_recycle_starts_replacement_first_then_drains():
    lc, (w1, w2) = boot(2)
    acts = lc.handle(P.RecycleRequested(w1), 1010.0)
    spawns = kinds(acts, P.Spawn)
    assert len(spawns) == 1 and spawns[0].slot == 0
    assert not kinds(acts, P.Drain)                        # old one keeps serving meanwhile
    new = spawns[0].wid
    # a second request while the replacement starts changes nothing
    assert not kinds(lc.handle(P.RecycleRequested(w1), 1010.1), P.Spawn)
    lc.handle(P.Forked(new, 5), 1010.1)
    acts = lc.handle(P.Ready(new), 1010.5)
    assert acts.index(P.Activate(new)) < acts.index(P.Drain(w1))
    assert lc.slots[0].worker == new
    # the old one's exit respawns nothing
    acts = lc.handle(P.Exited(w1, code=0), 1011.0)
    assert not kinds(acts, P.Spawn)


def test_recycle_candidate_crash_keeps_old_worker():
    lc, (w1, w2) = boot(2, max_restarts=2)
    new = kinds(lc.handle(P.RecycleRequested(w1), 1010.0), P.Spawn)[0].wid
    acts = lc.handle(P.Exited(new, code=1), 1010.2)
    assert not kinds(acts, P.Drain) and lc.slots[0].worker == w1
    due = lc.slots[0].recycle_due
    assert due is not None
    new2 = kinds(lc.handle(P.Tick(), due), P.Spawn)[0].wid
    lc.handle(P.Exited(new2, code=1), due + 0.1)
    assert lc.slots[0].recycle_due is None                 # gave up recycling; w1 still serves
    assert lc.slots[0].worker == w1 and not lc.stopping


def _ready(lc, wid, now):
    lc.handle(P.Forked(wid, 20000 + wid), now)
    return lc.handle(P.Ready(wid), now)


def test_rolling_restart_oldest_first_one_at_a_time():
    lc = P.Lifecycle()
    s = kinds(lc.handle(P.Start(3), 0.0), P.Spawn)
    # make slot 2's worker the oldest: it was respawned last for 0, 1
    for i, sp in enumerate(s):
        _ready(lc, sp.wid, 0.1)
    lc.workers[s[2].wid].started = -5.0
    acts = lc.handle(P.Reload(), 10.0)
    spawns = kinds(acts, P.Spawn)
    assert len(spawns) == 1 and spawns[0].slot == 2        # oldest first
    assert not kinds(acts, P.Drain)
    order = []
    now = 10.0
    while spawns:
        sp = spawns[0]
        now += 0.5
        acts = _ready(lc, sp.wid, now)
        drains = kinds(acts, P.Drain)
        assert len(drains) == 1                            # old one drained only after READY
        order.append(sp.slot)
        spawns = kinds(acts, P.Spawn)
        assert len(spawns) <= 1
    assert order == [2, 0, 1]
    assert not lc.reloading
    assert any("reload complete" in m for m in messages(acts))


def test_rolling_restart_aborts_when_replacement_crashes():
    lc, (w1, w2) = boot(2)
    cand = kinds(lc.handle(P.Reload(), 1010.0), P.Spawn)[0].wid
    acts = lc.handle(P.Exited(cand, code=1), 1010.3)
    assert not kinds(acts, P.Spawn) and not kinds(acts, P.Drain)
    assert not lc.reloading
    assert any("reload ABORTED" in m for m in messages(acts))
    assert lc.slots[0].worker == w1 and lc.slots[1].worker == w2
    assert lc.slots[0].crashes == 0                        # old workers unaffected


def test_rolling_restart_aborts_when_replacement_never_ready():
    lc, (w1, w2) = boot(2, ready_timeout=5.0)
    cand = kinds(lc.handle(P.Reload(), 1010.0), P.Spawn)[0].wid
    acts = lc.handle(P.Tick(), 1015.0)
    assert kinds(acts, P.Kill) == [P.Kill(cand, signal.SIGKILL)]
    assert any("reload ABORTED" in m for m in messages(acts))
    acts = lc.handle(P.Exited(cand, signal=9), 1015.1)
    assert not kinds(acts, P.Spawn) and not kinds(acts, P.Drain)
    assert lc.slots[0].worker == w1


def test_repeated_reload_replaces_workers_started_before_it():
    lc, (w1, w2) = boot(2)
    c1 = kinds(lc.handle(P.Reload(), 1010.0), P.Spawn)[0]
    assert not kinds(lc.handle(P.Reload(), 1010.1), P.Spawn)   # one at a time
    seen = []
    spawns = [c1]
    now = 1010.2
    while spawns:
        now += 0.2
        acts = _ready(lc, spawns[0].wid, now)
        seen.append(spawns[0].slot)
        spawns = kinds(acts, P.Spawn)
    # c1 was spawned in generation 1 < 2, so slot 0 is replaced again
    assert sorted(seen) == [0, 0, 1]
    assert all(lc.workers[s.worker].generation == 2 for s in lc.slots.values())


def test_reload_revives_given_up_slot():
    lc, (w1, w2) = boot(2, max_restarts=1)
    now = boot_fail_slot(lc, 0, 1000.2)
    assert lc.slots[0].state == P.GAVE_UP
    acts = lc.handle(P.Reload(), now + 1.0)
    assert {s.slot for s in kinds(acts, P.Spawn)} == {0, 1}
    assert lc.slots[0].state == P.RUNNING and lc.slots[0].retry_at is None


def test_graceful_stop_sequence():
    lc, (w1, w2) = boot(2, graceful_timeout=10.0)
    acts = lc.handle(P.Stop(graceful=True), 1100.0)
    assert kinds(acts, P.StopAccepting) == [P.StopAccepting()]
    assert not kinds(acts, P.Drain)                        # only after the backlog is dispatched
    assert not kinds(acts, P.CloseListeners)               # the backlog is still to be taken
    acts = lc.handle(P.Drained(), 1100.1)
    assert set(kinds(acts, P.Drain)) == {P.Drain(w1), P.Drain(w2)}
    assert kinds(acts, P.CloseListeners) == [P.CloseListeners()]   # later clients: refused
    acts = lc.handle(P.Exited(w1, code=0), 1101.0)
    assert not kinds(acts, P.Spawn) and not kinds(acts, P.Exit)
    acts = lc.handle(P.Tick(), 1110.0)                     # graceful timeout
    assert kinds(acts, P.Kill) == [P.Kill(w2, signal.SIGKILL)]
    acts = lc.handle(P.Exited(w2, signal=9), 1110.1)
    assert kinds(acts, P.Exit) == [P.Exit(0)]


def test_second_stop_escalates_to_immediate():
    lc, (w1, w2) = boot(2)
    lc.handle(P.Stop(graceful=True), 1100.0)
    acts = lc.handle(P.Stop(graceful=False), 1100.5)
    assert set(kinds(acts, P.Kill)) == {P.Kill(w1, signal.SIGQUIT), P.Kill(w2, signal.SIGQUIT)}
    assert kinds(acts, P.CloseListeners) == [P.CloseListeners()]  # not waiting for a backlog pass
    acts = lc.handle(P.Tick(), 1100.5 + P.IMMEDIATE_GRACE)
    assert set(kinds(acts, P.Kill)) == {P.Kill(w1, signal.SIGKILL), P.Kill(w2, signal.SIGKILL)}


def test_immediate_stop_closes_the_listeners_at_once():
    lc, (w1, w2) = boot(2)
    acts = lc.handle(P.Stop(graceful=False), 1100.0)
    assert kinds(acts, P.CloseListeners) == [P.CloseListeners()]
    assert not kinds(acts, P.StopAccepting)      # an immediate stop serves no backlog


def test_no_respawn_while_stopping():
    lc, (w1, w2) = boot(2)
    lc.handle(P.Stop(), 1100.0)
    acts = lc.handle(P.Exited(w1, code=1), 1100.1)
    assert not kinds(acts, P.Spawn)
    assert not kinds(lc.handle(P.Reload(), 1100.2), P.Spawn)
    assert not kinds(lc.handle(P.Scale(5), 1100.3), P.Spawn)


def test_scale_up_and_down():
    lc, (w1, w2) = boot(2)
    acts = lc.handle(P.Scale(3), 1010.0)
    assert [s.slot for s in kinds(acts, P.Spawn)] == [2]
    new = kinds(acts, P.Spawn)[0].wid
    _ready(lc, new, 1010.5)
    acts = lc.handle(P.Scale(1), 1011.0)
    assert set(kinds(acts, P.Drain)) == {P.Drain(new), P.Drain(w2)}
    assert set(kinds(acts, P.ReleaseSlot)) == {P.ReleaseSlot(1), P.ReleaseSlot(2)}
    assert list(lc.slots) == [0]
    assert not kinds(lc.handle(P.Exited(new, code=0), 1012.0), P.Spawn)
    # never below one
    assert list(lc.handle(P.Scale(0), 1013.0)) == []
    assert len(lc.slots) == 1


def test_scale_down_removes_given_up_slot_first():
    lc, (w1, w2) = boot(2, max_restarts=1)
    now = boot_fail_slot(lc, 1, 1000.2)
    acts = lc.handle(P.Scale(1), now + 1.0)
    assert kinds(acts, P.ReleaseSlot) == [P.ReleaseSlot(1)]
    assert not kinds(acts, P.Drain)


def test_worker_leaving_on_sigterm_is_replaced_without_counting_a_crash():
    lc, (w1, w2) = boot(2)
    acts = lc.handle(P.Leaving(w1), 1005.0)
    assert P.Drain(w1) in acts and len(kinds(acts, P.Spawn)) == 1
    acts = lc.handle(P.Exited(w1, code=0), 1005.1)
    assert not kinds(acts, P.Spawn) and lc.slots[0].crashes == 0


def test_fork_failure_counts_as_boot_failure():
    lc = P.Lifecycle()
    wid = kinds(lc.handle(P.Start(1), 0.0), P.Spawn)[0].wid
    acts = lc.handle(P.Exited(wid), 0.0)
    assert "could not be forked" in messages(acts)[0]
    assert lc.slots[0].state == P.BACKOFF and lc.slots[0].boot_failures == 1


def test_next_deadline():
    lc = P.Lifecycle(ready_timeout=30.0)
    wid = kinds(lc.handle(P.Start(1), 0.0), P.Spawn)[0].wid
    assert lc.next_deadline(0.0) == 30.0
    lc.handle(P.Exited(wid, code=1), 0.1)
    assert lc.next_deadline(0.1) == pytest.approx(0.3)


def test_reload_waits_for_a_recycle_in_progress():
    lc, (w1, w2) = boot(2)
    rec = kinds(lc.handle(P.RecycleRequested(w1), 1010.0), P.Spawn)[0]     # generation 0
    c2 = kinds(lc.handle(P.Reload(), 1010.1), P.Spawn)[0]                   # slot 1 (slot 0 is busy)
    assert c2.slot == 1
    acts = _ready(lc, c2.wid, 1010.5)
    assert not any("reload complete" in m for m in messages(acts))          # slot 0 still old
    acts = _ready(lc, rec.wid, 1010.6)                                      # recycle done (old gen)
    spawns = kinds(acts, P.Spawn)
    assert [s.slot for s in spawns] == [0]                                  # reload replaces it too
    acts = _ready(lc, spawns[0].wid, 1011.0)
    assert any("reload complete" in m for m in messages(acts))


def test_scale_is_bounded_by_capacity():
    lc, _ = boot(1, max_workers=2)
    acts = lc.handle(P.Scale(10), 1010.0)
    assert len(kinds(acts, P.Spawn)) == 1
    assert any("at most 2" in m for m in messages(acts))
