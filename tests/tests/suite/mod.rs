mod ask;
mod crash;
mod edits;
mod hostile;
mod lifecycle;
mod nvim;
mod protocol;
mod watch;
