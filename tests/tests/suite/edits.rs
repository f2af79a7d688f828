//! The user-visible edit flows over the socket.
