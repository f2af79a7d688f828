mod ask;
mod crash;
mod edits;
mod hostile;
mod lifecycle;
mod protocol;
mod shapes;
mod watch;
