"""tether: the whole RLHF pipeline (SFT, reward model, PPO, direct methods) on one machine or many."""

__version__ = "0.1.0"
