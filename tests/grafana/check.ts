/**
 * The type a generated dashboard must satisfy: @grafana/schema's `Dashboard`, as a JSON file spells it, with each
 * panel's options and field config typed by its panel type's own `Options` / `FieldConfig`.
 *
 * tests/test_dashboard_schema.py writes the dashboard as an object literal (so unknown fields are errors) with
 * `satisfies AsJson<CheckedDashboard<...>>`, one `PanelOf` per panel type it uses.
 */
import type { Dashboard, DataQuery, FieldConfig, FieldConfigSource, Panel } from "@grafana/schema";

/** A type as JSON can satisfy it: a string enum becomes the union of its values ("list", not LegendDisplayMode.List). */
export type AsJson<T> = T extends string
  ? `${T}`
  : T extends readonly (infer U)[]
    ? AsJson<U>[]
    : T extends object
      ? { [K in keyof T]: AsJson<T[K]> }
      : T;

/** T with the keys K optional: the keys of the panel type's `defaultOptions`, which Grafana merges in on load. */
export type Loaded<T, K extends PropertyKey> = Omit<T, K & keyof T> & Partial<Pick<T, K & keyof T>>;

/** A Prometheus target (the package carries no Prometheus query schema): a DataQuery with its PromQL and legend. */
export interface PromQuery extends DataQuery {
  expr: string;
  legendFormat?: string;
}

/** A panel of one type: its options are the type's `Options`, less only what `defaultOptions` fills in. */
export type PanelOf<Type extends string, Options, Custom, Filled extends PropertyKey> = Omit<
  Panel,
  "type" | "options" | "fieldConfig" | "targets"
> & {
  type: Type;
  options?: Loaded<Options, Filled>;
  fieldConfig?: Omit<FieldConfigSource, "defaults"> & { defaults: Omit<FieldConfig, "custom"> & { custom?: Custom } };
  targets?: PromQuery[];
};

/** The dashboard, its panels restricted to the union P of the panel types it uses. */
export type CheckedDashboard<P> = Omit<Dashboard, "panels"> & { panels?: P[] };
