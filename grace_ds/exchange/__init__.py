"""How tokens reach their experts' GPUs and come back (grace_ds.exchange.config: the settings)."""
from grace_ds.exchange.config import COMM_MODES, CommMode, CommunicationConfig

__all__ = ["COMM_MODES", "CommMode", "CommunicationConfig"]
