//! Property tests of the edit engine (apply/undo round trips, byte fidelity, commutation).
