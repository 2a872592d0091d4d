//! One step's view of a program's arena (the memory plan's single allocation of values and
//! gradients, `passes::memplan`), in safe code: the ranges a step writes are *taken* out as
//! `&mut` slices split off the arena, and everything else stays readable. A range that is
//! not wholly inside one untaken piece is refused (`None`), so a plan that let two buffers a
//! step touches overlap shows up as an error, never as aliased memory.
//!
//! Steps ask for whole buffers (a buffer's value or gradient, `batch x` its elements per
//! sample at its planned offset), and the buffers one step touches are live at once, hence
//! disjoint: the cuts one request makes never fall inside another's range.

/// The arena, split into the pieces not taken (see the module header).
pub(crate) struct Mem<'a> {
    /// Disjoint untaken pieces: `(offset in the arena, slice)`, in no particular order.
    free: Vec<(usize, &'a mut [f32])>,
}

impl<'a> Mem<'a> {
    /// The whole arena, nothing taken.
    pub fn new(arena: &'a mut [f32]) -> Mem<'a> {
        Mem { free: vec![(0, arena)] }
    }

    fn piece(&self, start: usize, len: usize) -> Option<usize> {
        self.free.iter().position(|(s, p)| *s <= start && start + len <= s + p.len())
    }

    /// `start..start + len` to read, if it lies inside one untaken piece.
    pub fn get(&self, start: usize, len: usize) -> Option<&[f32]> {
        let (s, p) = &self.free[self.piece(start, len)?];
        Some(&p[start - s..start - s + len])
    }

    /// `start..start + len` to write, split off its piece: nothing else can read or take it
    /// until it is [`put`](Mem::put) back.
    pub fn take(&mut self, start: usize, len: usize) -> Option<&'a mut [f32]> {
        let (s, p) = self.free.swap_remove(self.piece(start, len)?);
        let (left, rest) = p.split_at_mut(start - s);
        let (mid, right) = rest.split_at_mut(len);
        if !left.is_empty() {
            self.free.push((s, left));
        }
        if !right.is_empty() {
            self.free.push((start + len, right));
        }
        Some(mid)
    }

    /// Return a range [`take`](Mem::take) gave out (at its offset).
    pub fn put(&mut self, start: usize, piece: &'a mut [f32]) {
        self.free.push((start, piece));
    }
}

#[cfg(test)]
mod tests {
    use super::Mem;

    #[test]
    fn taken_ranges_are_neither_readable_nor_taken_twice() {
        let mut arena: Vec<f32> = (0..100).map(|i| i as f32).collect();
        let mut m = Mem::new(&mut arena);
        let a = m.take(10, 20).unwrap();
        assert_eq!(a[0], 10.0);
        assert!(m.get(25, 10).is_none(), "overlaps a taken range");
        assert!(m.take(0, 11).is_none(), "overlaps a taken range");
        assert!(m.get(5, 40).is_none(), "spans a taken range");
        assert_eq!(m.get(30, 5).unwrap(), &[30.0, 31.0, 32.0, 33.0, 34.0]);
        let b = m.take(40, 10).unwrap();
        a[0] = -1.0;
        b[0] = -2.0;
        m.put(10, a);
        assert_eq!(m.get(10, 1).unwrap(), &[-1.0]);
        assert!(m.get(95, 10).is_none(), "past the end");
        m.put(40, b);
        drop(m);
        assert_eq!((arena[10], arena[40]), (-1.0, -2.0));
    }
}
