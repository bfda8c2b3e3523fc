"""The GRPO row's reward, the same Python function on both sides: tether calls it as
`--reward-fn bench_reward:score` (prompt text, response text), TRL through a list-wise wrapper in
drive_peer.py. It is deliberately trivial (words near 20), so the row times the trainers, not a scorer."""


def score(prompt: str, response: str) -> float:
    return -abs(len(response.split()) - 20) / 20
