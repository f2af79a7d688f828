mod ask;
mod crash;
mod edits;
mod fidelity;
mod hostile;
mod lifecycle;
mod protocol;
mod watch;
