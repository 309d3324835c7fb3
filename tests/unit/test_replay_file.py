import orjson

from streamproc.tools.replay import read_events, topic_of


def test_csv_rows_are_typed_and_mapped(tmp_path):
    path = tmp_path / "events.csv"
    path.write_text(
        "id,cust,ts,order_id,type,amount,currency,items\n"
        'e1,c1,1767261600000,o1,purchase,12.5,EUR,"[{""product_id"": ""p"", ""category"": ""c"", '
        '""quantity"": 1, ""unit_price"": 12.5}]"\n'
    )
    (event,) = list(read_events(path, "csv", {"id": "event_id", "cust": "customer_id"}))
    assert event == {"event_id": "e1", "customer_id": "c1", "ts": 1767261600000, "order_id": "o1",
                     "type": "purchase", "amount": 12.5, "currency": "EUR",
                     "items": [{"product_id": "p", "category": "c", "quantity": 1, "unit_price": 12.5}]}
    assert topic_of(event) == "transactions"


def test_jsonl_lines_that_are_not_objects_are_reported(tmp_path):
    path = tmp_path / "events.jsonl"
    path.write_bytes(orjson.dumps({"session_id": "s", "ts": 1}) + b"\n[1]\nnot json\n\n")
    events = list(read_events(path, "jsonl", {}))
    assert events[0] == {"session_id": "s", "ts": 1} and events[1:] == [None, None]
    assert topic_of(events[0]) == "clicks"
