//! Little-endian integer fields for wire structs: alignment 1, fixed byte order, `Pod`.

use bytemuck::{Pod, Zeroable};

macro_rules! le_type {
    ($name:ident, $ty:ty, $n:expr) => {
        #[doc = concat!("A little-endian `", stringify!($ty), "` on the wire.")]
        #[derive(Clone, Copy, Default, PartialEq, Eq, Pod, Zeroable)]
        #[repr(transparent)]
        pub struct $name([u8; $n]);

        impl $name {
            /// Encodes a value.
            pub const fn new(v: $ty) -> Self {
                $name(v.to_le_bytes())
            }
            /// Decodes the value.
            pub const fn get(self) -> $ty {
                <$ty>::from_le_bytes(self.0)
            }
        }

        impl std::fmt::Debug for $name {
            fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                write!(f, "{}", self.get())
            }
        }

        impl From<$ty> for $name {
            fn from(v: $ty) -> Self {
                $name::new(v)
            }
        }
    };
}

le_type!(Le16, u16, 2);
le_type!(Le32, u32, 4);
le_type!(Le64, u64, 8);
le_type!(Le128, u128, 16);
