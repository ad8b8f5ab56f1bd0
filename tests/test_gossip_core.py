"""The gossip protocol core (deterministic) and the seeded network simulator."""

from __future__ import annotations

import random
from collections import Counter

import pytest

from meshhealth.gossip.messages import Blocks, FullHeads, FullHeadsRequest, Heads, Pull, Push, Send
from meshhealth.gossip.protocol import Gossip, GossipParams, PeerStatus
from meshhealth.gossip.sim import Simulation, node_id

A, B, C, D = (bytes([i]) * 32 for i in range(1, 5))


def core(me: bytes = A, peers: tuple[bytes, ...] = (B, C, D), **kw: object) -> Gossip:
    g = Gossip(me, random.Random(7), GossipParams(**kw))  # type: ignore[arg-type]
    for p in peers:
        g.add_peer(p, 0.0)
    return g


def test_new_block_is_pushed_to_fanout_peers_but_not_back_to_its_source() -> None:
    g = core(fanout=2)
    sends = g.on_block_stored(B, B, 0, 1.0, hops=1)
    assert len(sends) == 2 and B not in {s.peer for s in sends}
    assert all(s.message == Push(B, 0, 2) for s in sends)
    assert g.head(B) == 0
    assert g.on_block_stored(C, B, 0, 1.1) == []  # a duplicate is not forwarded
    assert g.stats.duplicates == 1
    with pytest.raises(ValueError, match="not contiguous"):
        g.on_block_stored(C, B, 5, 1.2)


def test_block_ahead_of_head_pulls_the_gap_once() -> None:
    g = core(pull_batch=3)
    (s,) = g.on_ahead(B, C, 10, 1.0)
    assert s == Send(B, Pull(C, 0, 2))  # bounded batch from our head + 1
    assert g.on_ahead(D, C, 10, 1.1) == []  # already pulling up to there
    assert g.on_ahead(D, C, 10, 5.0) != []  # the pull timed out: ask again


def test_heads_exchange_pulls_what_the_peer_has_and_answers_once() -> None:
    a, b = core(A), core(B, (A, C, D))
    for h in range(3):
        b.on_block_stored(None, C, h, 1.0, forward=False)
    (digest,) = a.on_tick(2.0)
    assert digest.peer in (B, C, D)
    out = b.on_message(A, Heads(a._recent(2.0), a.digest(), reply=False), 2.0)
    reply = [s for s in out if isinstance(s.message, Heads)]
    assert len(reply) == 1 and reply[0].message.reply
    pulls = a.on_message(B, reply[0].message, 2.1)
    assert pulls == [Send(B, Pull(C, 0, 2))]
    (blocks,) = b.on_message(A, pulls[0].message, 2.2)
    assert blocks == Send(A, Blocks(C, 0, 2, 0))
    assert b.on_message(A, Pull(C, 5, 9), 2.3) == []  # nothing to give


def test_hidden_difference_asks_for_the_full_vector() -> None:
    a, b = core(A, recent_window_s=1.0), core(B, (A,), recent_window_s=1.0)
    b.on_block_stored(None, D, 0, 0.0, forward=False)  # old news: outside the recent window
    reply = b.on_message(A, Heads((), a.digest(), reply=False), 10.0)[-1].message
    assert isinstance(reply, Heads) and reply.recent == ()
    (req,) = a.on_message(B, reply, 10.0)
    assert req == Send(B, FullHeadsRequest())
    (full,) = b.on_message(A, FullHeadsRequest(), 10.1)
    assert full.message == FullHeads(((D, 0),))
    assert a.on_message(B, full.message, 10.2) == [Send(B, Pull(D, 0, 0))]


def test_unanswered_digests_make_a_peer_suspect_then_dead_and_hearing_revives() -> None:
    g = core(A, (B,), reply_timeout_s=0.5, dead_after=3)
    t = 0.0
    for _ in range(3):
        g.on_tick(t)
        t += 1.0
        g.on_tick(t)  # the reply to the previous digest never came
    assert g.peers[B].status is PeerStatus.DEAD
    assert g.on_block_stored(None, A, 0, t) == []  # dead peers get no pushes
    g.on_message(B, Heads((), b"\0" * 16, reply=True), t + 0.1)
    assert g.peers[B].status is PeerStatus.ALIVE
    assert [s.peer for s in g.on_block_stored(None, A, 1, t + 0.2)] == [B]


def test_penalised_peer_is_avoided_until_its_backoff_ends() -> None:
    g = core(A, (B, C), fanout=2)
    g.penalise(B, 0.0)
    assert [s.peer for s in g.on_block_stored(None, A, 0, 0.5)] == [C]
    assert {s.peer for s in g.on_block_stored(None, A, 1, 5.0)} == {B, C}


# --- the simulator ---------------------------------------------------------------------


@pytest.mark.parametrize("seed", [1, 2, 3])
def test_thousand_nodes_every_block_reaches_every_node_despite_loss(seed: int) -> None:
    sim = Simulation(1000, seed=seed, loss=0.02)
    sim.run_until(0.5)
    blocks = [sim.produce(i) for i in (0, 17, 999)]
    assert sim.run_until_quiet(lambda: all(sim.everyone_has(b) for b in blocks), limit_s=20)
    hops = [nd.received_at[blocks[0]][1] for nd in sim.nodes]
    assert max(hops) <= 2 * 10  # ~2·log2(N) rounds


def test_partitioned_half_catches_up_after_heal() -> None:
    sim = Simulation(400, seed=5)
    sim.run_until(0.5)
    sim.partition([set(range(200)), set(range(200, 400))])
    blk = sim.produce(3)
    sim.run_until(sim.now + 5)
    assert sim.holders(blk) == 200  # only its own side
    sim.heal()
    assert sim.run_until_quiet(lambda: sim.everyone_has(blk), limit_s=30)


def test_crashed_node_catches_up_a_long_chain_after_recovery() -> None:
    sim = Simulation(200, seed=9, params=GossipParams(pull_batch=16))
    sim.run_until(0.5)
    sim.crash(42)
    last = None
    for _ in range(100):
        last = sim.produce(7)
        sim.run_until(sim.now + 0.05)
    assert last is not None and sim.nodes[42].core.head(node_id(7)) == -1
    sim.recover(42)
    assert sim.run_until_quiet(lambda: sim.nodes[42].core.head(node_id(7)) == 99, limit_s=60)
    assert sim.run_until_quiet(lambda: sim.everyone_has(last), limit_s=10)


def test_simulation_is_deterministic_for_a_seed() -> None:
    def run(seed: int) -> tuple[int, int]:
        sim = Simulation(300, seed=seed, loss=0.05)
        sim.run_until(0.3)
        blk = sim.produce(1)
        sim.run_until_quiet(lambda: sim.everyone_has(blk), limit_s=20)
        return sim.counters.messages, sim.counters.bytes

    assert run(11) == run(11)
    assert run(11) != run(12)


def test_restored_heads_continue_contiguously_and_match_the_digest() -> None:
    g, fresh = core(), core()
    g.restore({B: 4, C: 0})
    for h in range(5):
        fresh.on_block_stored(None, B, h, 0.0, forward=False)
    fresh.on_block_stored(None, C, 0, 0.0, forward=False)
    assert g.digest() == fresh.digest()
    assert g._recent(0.0) == ()  # restored heads are not news
    g.on_block_stored(None, B, 5, 1.0)
    assert g.head(B) == 5


def test_catch_up_asks_for_the_next_batch_when_a_reply_arrives() -> None:
    g = core(pull_batch=10)
    g.on_message(B, FullHeads(((C, 34),)), 1.0)  # B holds chain C up to 34: pull 0..9
    assert g.stats.pulls_sent == 1
    # a reply that stops short (the sender caps a reply's bytes) is continued where it ends
    assert g.on_blocks_arrived(B, C, 6, 1.1) == [Send(B, Pull(C, 7, 16))]
    assert g.on_blocks_arrived(B, C, 16, 1.2) == [Send(B, Pull(C, 17, 26))]
    for h in range(17):
        g.on_block_stored(B, C, h, 1.3, forward=False)
    assert g.on_blocks_arrived(B, C, 16, 1.4) == []  # an old reply: nothing new to ask
    assert g.on_blocks_arrived(B, C, 34, 1.5) == []  # the last batch: nothing more wanted


def test_one_peers_false_head_claim_does_not_stall_the_catch_up() -> None:
    """issue 11 #12: claims are kept per peer; an unanswered pull drops its peer's claim
    (ignored for ``distrust_s``) and the catch-up goes on from another peer's claim."""
    g = core(pull_batch=8, pull_timeout_s=2.0, distrust_s=30.0)
    (s,) = g.on_message(C, FullHeads(((D, 1_000_000),)), 1.0)  # C lies first
    assert s == Send(C, Pull(D, 0, 7))
    assert g.on_message(B, FullHeads(((D, 5),)), 1.1) == []  # one pull in flight per chain
    sends = g.on_tick(3.5)  # C never answered
    assert Send(B, Pull(D, 0, 5)) in sends
    assert g.stats.claims_dropped == 1
    assert g.on_message(C, FullHeads(((D, 1_000_000),)), 4.0) == []  # C is not heard on D
    for h in range(6):
        g.on_block_stored(B, D, h, 4.5, forward=False)
    assert g.wanted() == {}  # caught up with every claim still standing
    # the lowest claim ahead is tried first, so a liar cannot make us wait for its claim
    g2 = core()
    g2.on_message(B, FullHeads(((D, 3),)), 1.0)
    assert g2.on_message(C, FullHeads(((D, 10**6),)), 1.1) == []


def test_claims_about_our_own_chain_are_left_to_the_shell() -> None:
    g = core(A)
    assert g.on_message(B, FullHeads(((A, 1_000_000),)), 1.0) == []
    assert g.on_message(B, Heads(((A, 1_000_000),), b"\0" * 16, reply=True), 1.1) == []
    assert g.wanted() == {}
    # once the shell checked our own header at that height, it asks the core to fetch
    assert g.want(B, A, 3, 1.2) == [Send(B, Pull(A, 0, 3))]


def _serve(g: Gossip, sends: list[Send], now: float, honest: bytes, liar: bytes) -> list[Send]:
    """Answer ``g``'s pulls: ``honest`` with the blocks asked, ``liar`` with a block we
    hold (a reply that moves nothing), then apply what arrived, in order.  Returns what
    ``g`` sends next (answered on the next round)."""
    more: list[Send] = []
    for s in sends:
        if not isinstance(s.message, Pull):
            continue
        chain, lo, hi = s.message.chain, s.message.from_height, s.message.to_height
        if s.peer == liar:
            held = g.head(chain)
            more += g.on_blocks_arrived(liar, chain, held, now, from_height=held)
            g.on_duplicate(liar, now)
        elif s.peer == honest:
            more += g.on_blocks_arrived(honest, chain, hi, now, from_height=lo)
            for h in range(lo, hi + 1):
                if h == g.head(chain) + 1:
                    more += g.on_block_stored(honest, chain, h, now, forward=False)
    return more


@pytest.mark.parametrize("own", [False, True], ids=["other_chain", "own_chain"])
def test_a_liar_answering_with_blocks_we_hold_cannot_keep_the_catch_up(own: bool) -> None:
    """issue 11 #12 (attacker review): a peer claims head+2, pushes head+1 unsolicited,
    then answers every pull with a block we already hold.  An unsolicited Blocks frame
    does not take the pull over, and a reply that does not move our head is no answer
    (the claim is dropped, the next peer asked), so the honest peer's 1,000 blocks
    arrive.  For our own chain the shell re-adds every proved claim each second
    (core.want): a distrusted peer is skipped there too."""
    liar, honest = B, C  # on a tie the lower key is asked first: the liar
    chain = A if own else D
    g = core(A, pull_batch=64, pull_timeout_s=2.0, distrust_s=10.0)
    g.restore({chain: 5})

    def claim(p: bytes, h: int, t: float) -> list[Send]:
        if own:
            return g.want(p, chain, h, t)
        return g.on_message(p, FullHeads(((chain, h),)), t)

    now = 0.0
    pending = claim(honest, 1000, now)
    assert pending == [Send(honest, Pull(chain, 6, 69))]
    # the liar's lie and its one true block, unsolicited: the pull stays where it was
    pending += claim(liar, 1000 if own else 7, now)
    took = g.on_blocks_arrived(liar, chain, 6, now, from_height=6)
    assert took == []
    pending = took + g.on_block_stored(liar, chain, 6, now, forward=False)
    assert g._pulls[chain].src == honest
    # (the honest peer's reply to that first pull is lost: it must be asked again)
    pulls: Counter[bytes] = Counter(s.peer for s in pending)
    while now < 30.0 and g.head(chain) < 1000:
        now += 0.2
        # the liar keeps its claim just ahead of us (the lowest claim is asked first; our
        # own chain: it proved 1,000 too), and the shell re-wants every proved claim; a
        # claim may come in after a pull's deadline, before the tick that expires it
        sends = pending + claim(liar, 1000 if own else g.head(chain) + 2, now)
        sends += claim(honest, 1000, now) + g.on_tick(now)
        pulls.update(s.peer for s in sends if isinstance(s.message, Pull))
        pending = _serve(g, sends, now, honest, liar)
    assert g.head(chain) == 1000, (g.head(chain), pulls)
    assert pulls[honest] > 0


def test_a_buffered_blocks_charge_covers_its_decoded_entries_and_check_results() -> None:
    """issue 11 #7 (attacker review): a block waiting in the buffer is charged at least
    what its decoded entries and its check results (a reading's fields, rebuilt in the
    parent from the verifier's reply) take, measured, so the buffer's byte bounds hold."""
    import asyncio
    import pickle
    import time
    import tracemalloc

    from core_helpers import make_rogue

    from meshhealth.chain.block import decode_body, encode_body
    from meshhealth.ingest import verify
    from meshhealth.net.gossip_shell import Arrival, arrival_cost

    rogue = make_rogue(time.time_ns() // 1_000_000)
    n, t0 = 1000, 1_700_000_000_000
    body = encode_body([rogue.reading(i + 1, t0 + i) for i in range(n)])
    reply = pickle.dumps(verify.check_entries(list(decode_body(body))))  # as from a worker
    loop = asyncio.new_event_loop()
    try:
        tracemalloc.start()
        before = tracemalloc.get_traced_memory()[0]
        entries = list(decode_body(body))
        checked = loop.create_future()
        checked.set_result(pickle.loads(reply))
        taken = tracemalloc.get_traced_memory()[0] - before
        tracemalloc.stop()
        a = Arrival(B, B, 5, (b"h" * 200, body), 0, checked, entries)
        cost = arrival_cost(a) - len(body) - 200  # the raw frame is charged as is
        assert taken <= cost <= 2 * taken, (taken, cost)
    finally:
        loop.close()


def test_a_peer_that_keeps_leaving_pulls_without_progress_is_distrusted_longer() -> None:
    """Each further pull of a chain a peer leaves without progress doubles how long its
    claims about that chain are ignored (up to ``max_distrust_s``); progress clears it."""
    g = core(A, pull_timeout_s=2.0, distrust_s=10.0, max_distrust_s=35.0)
    now, held = 0.0, []
    for _ in range(4):
        assert g.on_message(C, FullHeads(((D, 100),)), now) != []  # heard again, asked
        now += 2.5
        g.on_tick(now)  # no progress: ignored for a while
        held.append(g._distrust[(C, D)] - now)
        assert g.on_message(C, FullHeads(((D, 100),)), now + held[-1] - 0.1) == []
        now += held[-1]
    assert held == [10.0, 20.0, 35.0, 35.0]
    g.on_connected(C, now - 1.0, fresh=False)  # a second link: nothing forgiven
    assert g.on_message(C, FullHeads(((D, 100),)), now - 1.0) == []
    g.on_connected(C, now - 1.0)  # its only link, new (a partition healed): forgiven
    assert g._strikes == {} and g._distrust == {}
    assert g.on_message(C, FullHeads(((D, 100),)), now) == [Send(C, Pull(D, 0, 63))]
    g.on_block_stored(C, D, 0, now, forward=False)  # progress: a clean slate
    assert (C, D) not in g._strikes
