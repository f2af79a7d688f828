mod ask;
mod crash;
mod edits;
mod hostile;
mod lifecycle;
mod protocol;
mod watch;
