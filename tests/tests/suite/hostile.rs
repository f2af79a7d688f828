//! Hostile patches: each is refused with its stable code and changes nothing anywhere.
