// Usage over time as inline SVG: the balance after each ledger entry (a step
// line), a dot per entry coloured by kind. Built from GET /api/credits/usage
// (newest first) and the current balance, walking back: the balance before
// an entry is the balance after it minus its amount. Text only via
// textContent (<title> tooltips included).

import { credits, h, num, s, when } from "./dom.js";

const W = 640;
const H = 240;
const M = { left: 56, right: 16, top: 16, bottom: 34 };

function niceMax(value) {
  if (value <= 0) return 10;
  const exp = 10 ** Math.floor(Math.log10(value));
  for (const step of [1, 1.2, 1.5, 2, 2.5, 3, 4, 5, 6, 8, 10]) {
    if (step * exp >= value) return step * exp;
  }
  return 10 * exp;
}

/** The points of the balance line, oldest first: [{t, balance, entry}]. */
export function balancePoints(entries, balanceNow) {
  const chrono = [...entries].reverse();
  let balance = balanceNow - chrono.reduce((sum, e) => sum + e.amount, 0);
  const points = [];
  if (chrono.length) {
    points.push({ t: new Date(chrono[0].createdAt).getTime(), balance, entry: null });
  }
  for (const entry of chrono) {
    balance += entry.amount;
    points.push({ t: new Date(entry.createdAt).getTime(), balance, entry });
  }
  return points;
}

export function usageChart(entries, balanceNow, total) {
  if (!entries.length) {
    return h("p", { class: "empty", id: "usage-chart" }, "No credits allocated or spent yet.");
  }
  const points = balancePoints(entries, balanceNow);
  const t0 = points[0].t;
  const t1 = points.at(-1).t;
  const byTime = t1 - t0 >= 1000;
  const x = (p, i) =>
    M.left +
    (W - M.left - M.right) * (byTime ? (p.t - t0) / (t1 - t0) : i / Math.max(1, points.length - 1));
  const top = niceMax(Math.max(...points.map((p) => p.balance)));
  const y = (b) => M.top + (H - M.top - M.bottom) * (1 - b / top);

  const grid = [];
  for (let i = 0; i <= 4; i += 1) {
    const value = (top * i) / 4;
    grid.push(
      s("line", { class: "grid", x1: M.left, x2: W - M.right, y1: y(value), y2: y(value) }),
      s("text", { class: "axis", x: M.left - 8, y: y(value) + 4, "text-anchor": "end" }, num(Math.round(value))),
    );
  }
  let d = `M ${x(points[0], 0).toFixed(1)} ${y(points[0].balance).toFixed(1)}`;
  points.slice(1).forEach((p, i) => {
    d += ` H ${x(p, i + 1).toFixed(1)} V ${y(p.balance).toFixed(1)}`;
  });
  const dots = points.slice(1).map((p, i) => {
    const e = p.entry;
    const sign = e.amount > 0 ? "+" : "";
    const about = [e.modelId, e.reason].filter(Boolean).join(", ");
    return s(
      "circle",
      { class: `dot ${e.kind}`, cx: x(p, i + 1).toFixed(1), cy: y(p.balance).toFixed(1), r: 4 },
      s(
        "title",
        {},
        `${when(e.createdAt)}: ${e.kind} ${sign}${num(e.amount)}${about ? ` (${about})` : ""} → balance ${num(p.balance)}`,
      ),
    );
  });
  const first = new Date(t0).toLocaleString();
  const last = new Date(t1).toLocaleString();
  const allocated = entries.filter((e) => e.amount > 0 && e.kind === "allocation").reduce((a, e) => a + e.amount, 0);
  const charged = -entries.filter((e) => e.kind === "charge").reduce((a, e) => a + e.amount, 0);
  const refunded = entries.filter((e) => e.kind === "refund").reduce((a, e) => a + e.amount, 0);
  const summary =
    `Balance over the last ${num(entries.length)} of ${num(total)} ledger entries: ` +
    `${credits(allocated)} allocated, ${credits(charged)} charged` +
    (refunded ? `, ${credits(refunded)} refunded` : "") +
    `; now ${credits(balanceNow)}.`;
  const svg = s(
    "svg",
    {
      class: "chart",
      viewBox: `0 0 ${W} ${H}`,
      role: "img",
      "aria-label": summary,
      preserveAspectRatio: "xMidYMid meet",
    },
    grid,
    s("line", { class: "axis-line", x1: M.left, x2: W - M.right, y1: y(0), y2: y(0) }),
    s("path", { class: "line", d }),
    dots,
    s("text", { class: "axis", x: M.left, y: H - 10 }, first),
    s("text", { class: "axis", x: W - M.right, y: H - 10, "text-anchor": "end" }, last),
  );
  return h(
    "figure",
    { class: "usage", id: "usage-chart", dataset: { points: points.length, balance: balanceNow } },
    svg,
    h(
      "figcaption",
      {},
      summary,
      h(
        "span",
        { class: "legend" },
        h("span", { class: "key allocation" }, "allocation"),
        h("span", { class: "key charge" }, "charge"),
        h("span", { class: "key refund" }, "refund"),
      ),
    ),
  );
}
