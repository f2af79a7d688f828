mod lifecycle;
mod protocol;
