"""The backend-agnostic core: numpy and the standard library only, never a framework."""
