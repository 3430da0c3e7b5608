from ratchet._retry import Retry
__all__ = ["Retry"]
