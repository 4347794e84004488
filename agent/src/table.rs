//! Text tables for the command-line tools: every column as wide as its longest cell, so long
//! names (`IngressDefaultRule`, a policy rule's full name) never push the next column out of line.

/// How a column's cells line up.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Align {
    Left,
    /// Numbers.
    Right,
}

pub struct Table {
    columns: Vec<(String, Align)>,
    rows: Vec<Vec<String>>,
}

impl Table {
    pub fn new(columns: &[(&str, Align)]) -> Table {
        Table {
            columns: columns.iter().map(|(h, a)| (h.to_string(), *a)).collect(),
            rows: Vec::new(),
        }
    }

    pub fn row(&mut self, cells: Vec<String>) {
        debug_assert_eq!(cells.len(), self.columns.len());
        self.rows.push(cells);
    }

    /// The table with a header line; the last column is not padded on the right.
    pub fn render(&self) -> String {
        let widths: Vec<usize> = (0..self.columns.len())
            .map(|i| {
                self.rows
                    .iter()
                    .map(|r| r[i].chars().count())
                    .chain([self.columns[i].0.chars().count()])
                    .max()
                    .unwrap_or(0)
            })
            .collect();
        let header: Vec<String> = self.columns.iter().map(|(h, _)| h.clone()).collect();
        let mut out = String::new();
        for cells in std::iter::once(&header).chain(&self.rows) {
            let last = cells.len() - 1;
            let line: Vec<String> = cells
                .iter()
                .enumerate()
                .map(|(i, cell)| match (self.columns[i].1, i == last) {
                    (Align::Right, _) => format!("{cell:>w$}", w = widths[i]),
                    (Align::Left, true) => cell.clone(),
                    (Align::Left, false) => format!("{cell:<w$}", w = widths[i]),
                })
                .collect();
            out.push_str(&line.join("  "));
            out.push('\n');
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn columns_fit_their_longest_cell() {
        let mut t = Table::new(&[("STAGE", Align::Left), ("PACKETS", Align::Right)]);
        t.row(vec!["Output".into(), "7".into()]);
        t.row(vec!["IngressDefaultRule".into(), "123456".into()]);
        assert_eq!(
            t.render(),
            "STAGE               PACKETS\n\
             Output                    7\n\
             IngressDefaultRule   123456\n"
        );
    }

    #[test]
    fn the_last_column_is_not_padded() {
        let mut t = Table::new(&[("A", Align::Left), ("B", Align::Left)]);
        t.row(vec!["long cell".into(), "x".into()]);
        assert_eq!(t.render(), "A          B\nlong cell  x\n");
    }
}
