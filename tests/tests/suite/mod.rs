mod ask;
mod crash;
mod daily;
mod edits;
mod hostile;
mod lifecycle;
mod protocol;
mod watch;
