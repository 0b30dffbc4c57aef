// The room's Costs tab (split the bill, R9): add an expense split among chosen people
// (equally, by shares or by exact parts), the list, each person's balance per currency, and settle-up suggestions with a
// "record payment" button. Amounts travel as integer minor units (never floats): what is
// typed is parsed as a decimal string with the currency's exponent, from the node's table.

import { auth, request, roomPath } from "../api.js";
import { tr } from "../i18n.js";
import { $, h } from "./dom.js";
import { showErrorIn } from "./forms.js";
import { currentUser } from "./user.js";

const LAST_CURRENCY_KEY = "sfumesh.currency";

/** Minor units as a decimal string: 123456, 2 -> "1234.56". @param {number} minor @param {number} exponent */
export function formatMinor(minor, exponent) {
  const sign = minor < 0 ? "−" : "";
  const digits = String(Math.abs(minor)).padStart(exponent + 1, "0");
  if (exponent === 0) return sign + digits;
  return `${sign}${digits.slice(0, -exponent)}.${digits.slice(-exponent)}`;
}

/** "12.3" with exponent 2 -> 1230; null when it is not such an amount. @param {string} text @param {number} exponent */
export function parseMinor(text, exponent) {
  const match = /^(\d{1,13})(?:[.,](\d+))?$/.exec(text.trim());
  if (!match) return null;
  const fraction = match[2] ?? "";
  if (fraction.length > exponent) return null;
  return Number(match[1] + fraction.padEnd(exponent, "0"));
}

/**
 * @param {ParentNode} root the room, holding the costs panel
 * @param {string} slug
 */
export function costsPanel(root, slug) {
  const panel = /** @type {HTMLElement} */ ($(root, "#panel-costs"));
  const form = /** @type {HTMLFormElement} */ ($(panel, "#expense-form"));
  const what = /** @type {HTMLInputElement} */ ($(form, "#expense-what"));
  const amount = /** @type {HTMLInputElement} */ ($(form, "#expense-amount"));
  const currency = /** @type {HTMLSelectElement} */ ($(form, "#expense-currency"));
  const payer = /** @type {HTMLSelectElement} */ ($(form, "#expense-payer"));
  const among = /** @type {HTMLElement} */ ($(form, "#expense-among"));
  const mode = /** @type {HTMLSelectElement} */ ($(form, "#expense-mode"));
  const legend = /** @type {HTMLElement} */ ($(form, "#expense-among-legend"));
  const error = /** @type {HTMLElement} */ ($(panel, "#costs-error"));
  const balancesList = /** @type {HTMLElement} */ ($(panel, "#balances"));
  const settleList = /** @type {HTMLElement} */ ($(panel, "#settle-up"));
  const expenseList = /** @type {HTMLElement} */ ($(panel, "#expenses"));

  /** @type {any} */
  let books = null;
  /** @type {Promise<void> | null} */
  let pending = null;
  let dirty = false;

  const nameOf = (/** @type {string} */ id) =>
    books?.people.find((/** @type {any} */ p) => p.id === id)?.display_name ?? "?";
  const money = (/** @type {number} */ minor, /** @type {string} */ code) =>
    `${formatMinor(minor, books?.currencies[code] ?? 2)} ${code}`;

  const call = async (/** @type {string} */ method, /** @type {string} */ path, /** @type {unknown} */ body) => {
    const token = await auth.sessionToken();
    return request(method, `${roomPath(slug)}${path}`, { token, body });
  };

  const fillForm = () => {
    const me = currentUser()?.id;
    if (currency.options.length === 0) {
      const codes = Object.keys(books.currencies).sort();
      currency.replaceChildren(...codes.map((code) => h("option", { value: code }, code)));
      currency.value = localStorage.getItem(LAST_CURRENCY_KEY) ?? "EUR";
    }
    const chosenPayer = payer.value || me || "";
    payer.replaceChildren(
      ...books.people.map((/** @type {any} */ p) => h("option", { value: p.id }, p.display_name)),
    );
    payer.value = chosenPayer;
    // Everyone shares by default; whom one unticked stays unticked across reloads, and
    // the shares or parts typed so far stay typed.
    const boxes = /** @type {HTMLInputElement[]} */ ([...among.querySelectorAll("input.who")]);
    const unticked = new Set(boxes.filter((box) => !box.checked).map((box) => box.value));
    /** @type {Map<string, string>} */
    const typed = new Map(
      [...among.querySelectorAll("input.part")].map((el) => {
        const input = /** @type {HTMLInputElement} */ (el);
        return [input.dataset.person ?? "", input.value];
      }),
    );
    among.replaceChildren(
      ...books.people.map((/** @type {any} */ p) => {
        const box = /** @type {HTMLInputElement} */ (h("input", { type: "checkbox", class: "who", value: p.id }));
        box.checked = !unticked.has(p.id);
        const part = /** @type {HTMLInputElement} */ (
          h("input", { class: "part", "data-person": p.id, inputmode: "decimal", autocomplete: "off" })
        );
        part.value = typed.get(p.id) ?? "";
        part.setAttribute("aria-label", p.display_name);
        return h("div", { class: "check" }, h("label", {}, box, " ", p.display_name), part);
      }),
    );
    showParts();
  };

  const showParts = () => {
    for (const part of among.querySelectorAll("input.part")) {
      /** @type {HTMLInputElement} */ (part).hidden = mode.value === "equal";
    }
    const legends = /** @type {Record<string, string>} */ ({
      equal: "costs_split_equally",
      shares: "costs_split_shares",
      exact: "costs_split_exact",
    });
    tr(legend, legends[mode.value] ?? "costs_split_equally");
  };
  mode.addEventListener("change", showParts);

  /** The split the form describes, or null (and the error shown). @param {string} code */
  const splitOf = (/** @type {string} */ code) => {
    const chosen = [...among.querySelectorAll("div.check")].filter(
      (row) => /** @type {HTMLInputElement} */ ($(row, "input.who")).checked,
    );
    const ids = chosen.map((row) => /** @type {HTMLInputElement} */ ($(row, "input.who")).value);
    if (mode.value === "equal") return { mode: "equal", people: ids };
    /** @type {Record<string, number>} */
    const values = {};
    for (const row of chosen) {
      const id = /** @type {HTMLInputElement} */ ($(row, "input.who")).value;
      const text = /** @type {HTMLInputElement} */ ($(row, "input.part")).value;
      const value =
        mode.value === "shares"
          ? /^\d{1,4}$/.test(text.trim()) ? Number(text) : null
          : parseMinor(text, books?.currencies[code] ?? 2);
      if (value === null || (mode.value === "shares" && value < 1)) {
        tr(error, mode.value === "shares" ? "costs_bad_share" : "costs_bad_amount", { currency: code });
        return null;
      }
      values[id] = value;
    }
    return mode.value === "shares" ? { mode: "shares", shares: values } : { mode: "exact", amounts: values };
  };

  const renderBooks = () => {
    const me = currentUser()?.id;
    const rows = [];
    for (const [code, perPerson] of Object.entries(books.balances)) {
      for (const [id, value] of Object.entries(/** @type {Record<string, number>} */ (perPerson))) {
        rows.push(
          h(
            "li",
            { class: value > 0 ? "owed" : "owing", "data-person": id, "data-currency": code },
            h("span", { class: "person" }, nameOf(id)),
            " ",
            h("span", { class: "amount" }, money(value, code)),
          ),
        );
      }
    }
    if (rows.length === 0) rows.push(tr(h("li", { class: "settled" }), "costs_all_settled"));
    balancesList.replaceChildren(...rows);

    const transfers = [];
    for (const [code, list] of Object.entries(books.settle_up)) {
      for (const tr_ of /** @type {any[]} */ (list)) {
        const button = tr(h("button", { type: "button", class: "secondary record" }), "costs_record_payment");
        button.addEventListener("click", async () => {
          /** @type {HTMLButtonElement} */ (button).disabled = true;
          try {
            await call("POST", "/payments", { ...tr_, currency: code });
            await refresh();
          } catch (err) {
            showErrorIn(error, err);
            /** @type {HTMLButtonElement} */ (button).disabled = false;
          }
        });
        transfers.push(
          h(
            "li",
            {},
            tr(h("span", {}), "costs_pays", {
              payer: nameOf(tr_.payer_id),
              payee: nameOf(tr_.payee_id),
              amount: money(tr_.amount, code),
            }),
            " ",
            button,
          ),
        );
      }
    }
    settleList.replaceChildren(...transfers);

    expenseList.replaceChildren(
      ...books.expenses.map((/** @type {any} */ e) => {
        const li = h(
          "li",
          { "data-id": e.id },
          h("strong", {}, e.description),
          " ",
          h("span", { class: "amount" }, money(e.amount, e.currency)),
          " ",
          tr(h("span", { class: "meta" }), "costs_paid_by", { name: nameOf(e.payer_id) }),
        );
        if (e.created_by === me) {
          const remove = tr(h("button", { type: "button", class: "link" }), "costs_delete");
          remove.addEventListener("click", async () => {
            try {
              await call("DELETE", `/expenses/${encodeURIComponent(e.id)}?version=${e.version}`);
              await refresh();
            } catch (err) {
              showErrorIn(error, err);
            }
          });
          li.append(" ", remove);
        }
        return li;
      }),
    );
  };

  const load = async () => {
    books = await call("GET", "/costs");
    fillForm();
    renderBooks();
    panel.dataset.loaded = "true";
  };

  /** Reload the books; changes arriving meanwhile make one more reload, never a pile. */
  const refresh = () => {
    dirty = true;
    if (pending === null) {
      pending = (async () => {
        while (dirty) {
          dirty = false;
          await load();
        }
      })()
        .catch((err) => showErrorIn(error, err))
        .finally(() => {
          pending = null;
        });
    }
    return pending;
  };

  form.addEventListener("submit", async (event) => {
    event.preventDefault();
    error.textContent = "";
    delete error.dataset.i18n;
    const code = currency.value;
    const minor = parseMinor(amount.value, books?.currencies[code] ?? 2);
    if (minor === null || minor <= 0) {
      tr(error, "costs_bad_amount", { currency: code });
      return;
    }
    const split = splitOf(code);
    if (split === null) return;
    try {
      await call("POST", "/expenses", {
        description: what.value,
        amount: minor,
        currency: code,
        payer_id: payer.value,
        split,
      });
      localStorage.setItem(LAST_CURRENCY_KEY, code);
      what.value = "";
      amount.value = "";
      await refresh();
    } catch (err) {
      showErrorIn(error, err);
    }
  });

  return {
    refresh,
    /** A `costs` event of the room: someone changed the books. */
    changed: () => refresh(),
  };
}
